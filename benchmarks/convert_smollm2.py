"""`gguflm convert` on a real model: SmolLM2-135M-Instruct, round-tripped through a Hugging Face
checkpoint directory, against the GGUF llama.cpp made of it.

No HF checkpoint is at hand offline, so one is rebuilt from the shipped Q4_1 GGUF: every tensor
dequantized to F32 (gguf-py), q/k rows put back in Hugging Face's rotate-half order, saved as
`model.safetensors` with a LlamaConfig from the file's keys and SmolLM2's tokenizer (vocabulary,
merges, chat template). Then:

1. `gguflm convert DIR OUT --outtype f32|f16|q8_0` is timed (peak RSS of the process, wall time);
   where llama.cpp's converter is at hand it runs on the same directory for the same figures;
2. the f32 file must hold exactly the dequantized tensors of the original (the q/k permutation
   round-trips bit for bit) and the original's tokenizer and hyper-parameter keys.

    python benchmarks/convert_smollm2.py [--work DIR] [--outtypes f32,f16,q8_0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hf_checkpoints import _smollm2_tokenizer

from gguflm.paths import default_model_path

LLAMA_CPP = Path("/tmp/lsrv/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py")
HF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def dequantized(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    return {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(
            tuple(reversed(t.shape.tolist()))
        )
        for t in reader.tensors
    }


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return f"{HF_NAMES[parts[0]]}.{parts[1]}"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved q/k rows back to Hugging Face's halves, per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def build_checkpoint(source: Path, out: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(source)
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    n_head, n_head_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    tensors = dequantized(reader)
    weights = {}
    for name, value in tensors.items():
        if ".attn_q." in name:
            value = unpermute(value, n_head)
        elif ".attn_k." in name:
            value = unpermute(value, n_head_kv)
        weights[hf_name(name)] = torch.from_numpy(np.ascontiguousarray(value))
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta["llama.vocab_size"],
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": meta["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": meta["llama.rope.freq_base"],
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = _smollm2_tokenizer()
    tokenizer.save_pretrained(out)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["add_prefix_space"] = False  # as SmolLM2's own tokenizer_config.json says
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return tensors


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one command, measured by GNU time in its own process (a child
    forked from this big process would start its high-water mark at this process's size)."""
    t0 = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {run.stderr[-2000:]}")
    return time.perf_counter() - t0, int(run.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert_smollm2"))
    parser.add_argument("--outtypes", default="f32,f16,q8_0")
    args = parser.parse_args()
    source = default_model_path()
    hf_dir = args.work / "SmolLM2-135M-Instruct"
    original = build_checkpoint(source, hf_dir)
    print(f"checkpoint: {hf_dir} ({sum(v.size for v in original.values()) / 1e6:.1f} M parameters, F32)")
    rows = []
    for outtype in args.outtypes.split(","):
        ours = args.work / f"gguflm-{outtype}.gguf"
        wall, rss = timed(
            [sys.executable, "-m", "gguflm", "convert", str(hf_dir), str(ours), "--outtype", outtype]
        )
        row = f"| {outtype} | gguflm | {wall:.1f} | {rss:.0f} | {ours.stat().st_size / 2**20:.1f} |"
        rows.append(row)
        if LLAMA_CPP.is_file():
            theirs = args.work / f"llama.cpp-{outtype}.gguf"
            wall, rss = timed(
                [sys.executable, str(LLAMA_CPP), str(hf_dir), "--outfile", str(theirs), "--outtype", outtype]
            )
            rows.append(
                f"| {outtype} | llama.cpp | {wall:.1f} | {rss:.0f} | {theirs.stat().st_size / 2**20:.1f} |"
            )
    print("| outtype | converter | seconds | peak RSS MiB | file MiB |\n| --- | --- | --- | --- | --- |")
    print("\n".join(rows))

    f32 = args.work / "gguflm-f32.gguf"
    if f32.is_file():
        converted = gguf.GGUFReader(f32)
        values = dequantized(converted)
        same = (
            all(np.array_equal(values[k], original[k]) for k in original) and values.keys() == original.keys()
        )
        print(f"f32 tensors equal to the original's dequantized tensors: {same}")
        old = gguf.GGUFReader(source).fields
        new = converted.fields
        differ = [
            k
            for k in old
            if not k.startswith(("GGUF.", "general.")) and old[k].contents() != new.get(k, old[k]).contents()
        ]
        missing = [k for k in old if k not in new]
        print(f"keys differing from the original (general.* aside): {differ}; absent: {missing}")
    for outtype in args.outtypes.split(","):
        theirs_path = args.work / f"llama.cpp-{outtype}.gguf"
        if not theirs_path.is_file():
            continue
        ours_r, theirs_r = gguf.GGUFReader(args.work / f"gguflm-{outtype}.gguf"), gguf.GGUFReader(theirs_path)
        keys = [
            k
            for k in ours_r.fields.keys() | theirs_r.fields.keys()
            if not k.startswith("GGUF.")
            and (k not in ours_r.fields or k not in theirs_r.fields
                 or ours_r.fields[k].contents() != theirs_r.fields[k].contents()
                 or ours_r.fields[k].types != theirs_r.fields[k].types)
        ]  # fmt: skip
        raw = {t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in ours_r.tensors}
        same = raw == {
            t.name: (t.tensor_type, bytes(np.asarray(t.data).view(np.uint8))) for t in theirs_r.tensors
        }
        print(f"{outtype}: against llama.cpp's file, keys differing {sorted(keys)}, tensors identical {same}")


if __name__ == "__main__":
    main()
