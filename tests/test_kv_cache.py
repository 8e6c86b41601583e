"""KVCache bookkeeping: cells, slots, masks and sequence operations, without a model."""

import numpy as np
import pytest
import torch

from gguflm.kv_cache import KVCache


def shift_by_adding(layer: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A stand-in for RoPE that makes the shift visible: key (n, n_head_kv, head_dim) += delta (n,)."""
    return k + delta[:, None, None].to(k.dtype)


def make_cache(n_ctx: int = 8, n_seq_max: int = 3) -> KVCache:
    return KVCache(
        n_layer=2, n_ctx=n_ctx, n_head_kv=1, head_dim=2, n_seq_max=n_seq_max, shift_keys=shift_by_adding
    )


def fill(cache: KVCache, seq_id: int, positions: list[int]) -> np.ndarray:
    cells = cache.find_slots(len(positions))
    assert cells is not None
    seq = np.zeros((len(positions), cache.n_seq_max), dtype=bool)
    seq[:, seq_id] = True
    cache.occupy(cells, np.array(positions), seq)
    return cells


def test_find_slots_takes_lowest_free_cells_and_refuses_when_full() -> None:
    cache = make_cache(n_ctx=4)
    fill(cache, 0, [0, 1, 2])
    cache.seq_rm(0, 1, 2)
    assert cache.find_slots(2).tolist() == [1, 3]
    assert cache.find_slots(3) is None
    assert cache.n_span() == 3


def test_mask_sees_own_sequence_and_past_only() -> None:
    cache = make_cache()
    fill(cache, 0, [0, 1])
    fill(cache, 1, [0])
    seq = np.array([[True, False, False], [False, True, False]])
    mask = cache.attention_mask(np.array([1, 0]), seq, cache.n_span())
    assert mask.tolist() == [[True, True, False], [False, False, True]]


def test_seq_rm_cp_keep() -> None:
    cache = make_cache()
    fill(cache, 0, [0, 1, 2, 3])
    cache.seq_cp(0, 1, 0, 2)
    assert (cache.seq_pos_min(1), cache.seq_pos_max(1)) == (0, 1)
    cache.seq_rm(0, 2, -1)
    assert cache.seq_pos_max(0) == 1 and cache.n_used == 2
    cache.seq_rm(0)
    assert cache.n_used == 2  # still held by sequence 1
    cache.seq_keep(2)
    assert cache.n_used == 0 and cache.seq_pos_max(1) == -1


def test_seq_add_shifts_positions_rotates_keys_and_frees_negative() -> None:
    cache = make_cache()
    cells = fill(cache, 0, [0, 1, 2, 3])
    before = cache.k[:, cells].clone()
    cache.seq_add(0, 2, -1, -2)
    assert cache.pos[cells].tolist() == [0, 1, 0, 1]
    assert torch.equal(cache.k[:, cells[2:]], before[:, 2:] - 2)
    assert torch.equal(cache.k[:, cells[:2]], before[:, :2])
    cache.seq_add(0, 0, 1, -5)  # positions below zero free their cells
    assert cache.n_used == 2  # the two cells at position 0


def test_seq_div() -> None:
    cache = make_cache()
    cells = fill(cache, 0, [0, 1, 2, 3, 4, 5])
    cache.seq_div(0, 2, -1, 2)
    assert cache.pos[cells].tolist() == [0, 1, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        cache.seq_div(0, 0, -1, 0)


def test_bad_sequence_id_is_an_error() -> None:
    cache = make_cache(n_seq_max=2)
    with pytest.raises(ValueError, match="outside"):
        cache.seq_cp(0, 2)
    with pytest.raises(ValueError):
        cache.seq_pos_max(-1)


def test_snapshot_restore() -> None:
    cache = make_cache()
    fill(cache, 0, [0, 1])
    state = cache.snapshot()
    fill(cache, 1, [0, 1, 2])
    cache.restore(state)
    assert cache.n_used == 2 and cache.seq_pos_max(1) == -1


def test_a_cache_too_big_to_allocate_is_a_clear_memory_error() -> None:
    with pytest.raises(MemoryError, match="KV cache of 1099511627776 cells"):
        make_cache(n_ctx=2**40)
