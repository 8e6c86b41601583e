"""Sampling and grammar flags shared by `gguflm run` and `gguflm chat`, with llama.cpp's names."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gguflm.grammar import Grammar
from gguflm.sampling import DEFAULT_SEED, SamplerParams, parse_samplers


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SamplerParams()
    g = p.add_argument_group("sampling (llama.cpp's flags and defaults)")
    g.add_argument("-s", "--seed", type=int, default=DEFAULT_SEED, help="random seed (default: random)")
    g.add_argument("--temp", type=float, default=d.temp, help="temperature; 0 is greedy")
    g.add_argument("--dynatemp-range", type=float, default=d.dynatemp_range)
    g.add_argument("--dynatemp-exp", type=float, default=d.dynatemp_exponent)
    g.add_argument("--top-k", type=int, default=d.top_k)
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--min-p", type=float, default=d.min_p)
    g.add_argument("--typical", type=float, default=d.typ_p)
    g.add_argument("--top-nsigma", type=float, default=d.top_n_sigma)
    g.add_argument("--xtc-probability", type=float, default=d.xtc_probability)
    g.add_argument("--xtc-threshold", type=float, default=d.xtc_threshold)
    g.add_argument("--repeat-last-n", type=int, default=d.penalty_last_n)
    g.add_argument("--repeat-penalty", type=float, default=d.penalty_repeat)
    g.add_argument("--presence-penalty", type=float, default=d.penalty_present)
    g.add_argument("--frequency-penalty", type=float, default=d.penalty_freq)
    g.add_argument("--dry-multiplier", type=float, default=d.dry_multiplier)
    g.add_argument("--dry-base", type=float, default=d.dry_base)
    g.add_argument("--dry-allowed-length", type=int, default=d.dry_allowed_length)
    g.add_argument("--dry-penalty-last-n", type=int, default=d.dry_penalty_last_n)
    g.add_argument("--mirostat", type=int, default=d.mirostat, choices=[0, 1, 2])
    g.add_argument("--mirostat-lr", type=float, default=d.mirostat_eta)
    g.add_argument("--mirostat-ent", type=float, default=d.mirostat_tau)
    g.add_argument("--samplers", help="sampler order, ';'-separated names (e.g. 'top_k;top_p;temperature')")
    g.add_argument("--sampling-seq", help="sampler order as letters (e.g. 'edskypmxt')")
    g.add_argument(
        "-l",
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID(+|-)BIAS",
        help="e.g. 15043+1 or 15043-inf; may repeat",
    )
    c = p.add_argument_group("constrained output")
    c.add_argument("--grammar", help="a GBNF grammar")
    c.add_argument("--grammar-file", help="a file holding a GBNF grammar")
    c.add_argument("-j", "--json-schema", help="a JSON schema the output must validate against")


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        for sign in ("+", "-"):
            head, sep, tail = item.partition(sign)
            if sep and head.strip().isdigit():
                value = float(tail)
                bias[int(head)] = value if sign == "+" else -value
                break
        else:
            raise ValueError(f"--logit-bias takes TOKEN_ID+BIAS or TOKEN_ID-BIAS, got {item!r}")
    return bias


def sampler_params(args: argparse.Namespace) -> SamplerParams:
    """SamplerParams from the flags; bad values are a ValueError with the reason."""
    samplers = list(SamplerParams().samplers)
    if args.samplers:
        samplers = parse_samplers(args.samplers)
    elif args.sampling_seq:
        samplers = parse_samplers(args.sampling_seq)
    return SamplerParams(
        seed=args.seed,
        temp=args.temp,
        dynatemp_range=args.dynatemp_range,
        dynatemp_exponent=args.dynatemp_exp,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        typ_p=args.typical,
        top_n_sigma=args.top_nsigma,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        penalty_last_n=args.repeat_last_n,
        penalty_repeat=args.repeat_penalty,
        penalty_present=args.presence_penalty,
        penalty_freq=args.frequency_penalty,
        dry_multiplier=args.dry_multiplier,
        dry_base=args.dry_base,
        dry_allowed_length=args.dry_allowed_length,
        dry_penalty_last_n=args.dry_penalty_last_n,
        mirostat=args.mirostat,
        mirostat_eta=args.mirostat_lr,
        mirostat_tau=args.mirostat_ent,
        logit_bias=_logit_bias(args.logit_bias),
        samplers=samplers,
    )


def grammar_from_args(args: argparse.Namespace) -> Grammar | None:
    """The constraint the flags ask for, checked before any generation; None when there is none."""
    given = [x for x in (args.grammar, args.grammar_file, args.json_schema) if x]
    if len(given) > 1:
        raise ValueError("give only one of --grammar, --grammar-file and --json-schema")
    if args.grammar:
        return Grammar.from_gbnf(args.grammar)
    if args.grammar_file:
        try:
            text = Path(args.grammar_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot read grammar file {args.grammar_file}: {e.strerror}") from e
        return Grammar.from_gbnf(text)
    if args.json_schema:
        try:
            schema = json.loads(args.json_schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema is not valid JSON: {e}") from e
        return Grammar.from_json_schema(schema)
    return None
