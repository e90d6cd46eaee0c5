"""`patho-r1` command line.  Each subcommand imports its module lazily, so `patho-r1 --help` stays fast."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from patho.errors import PathoError


def _cmd_tiny_model(args) -> int:
    from patho.tiny import TinySpec, build_tiny_model

    spec = TinySpec(hidden_size=args.hidden_size, num_hidden_layers=args.layers, seed=args.seed)
    out = build_tiny_model(args.out, spec)
    print(f"tiny Qwen2.5-VL written to {out}")
    return 0


def _cmd_synth_data(args) -> int:
    from patho.synth import WorldConfig, generate_world

    cfg = WorldConfig(tile_size=args.tile_size, n_train_tiles=args.n_train_tiles, n_heldout_tiles=args.n_heldout_tiles)
    manifest = generate_world(args.out, seed=args.seed, config=cfg)
    print(json.dumps(manifest["files"], indent=2))
    return 0


def _cmd_data_validate(args) -> int:
    from patho.data import DataError, iter_vlmeval_tsv, validate_file

    try:
        if args.kind == "vlmeval_tsv":
            n = sum(1 for _ in iter_vlmeval_tsv(args.file))
        else:
            n = validate_file(args.file, args.kind)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: {n} valid {args.kind} rows")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patho-r1", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build a tiny random-init Qwen2.5-VL + tokenizer + processor (no network)")
    p.add_argument("out", help="output directory")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("synth-data", help="generate the synthetic pathology world (all dataset kinds)")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=56)
    p.add_argument("--n-train-tiles", type=int, default=600)
    p.add_argument("--n-heldout-tiles", type=int, default=120)
    p.set_defaults(func=_cmd_synth_data)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    v = data_sub.add_parser("validate", help="validate a data file; errors name the file, row and field")
    v.add_argument("file")
    v.add_argument("--kind", required=True, choices=["caption", "conversation", "mcq", "embed_pair", "vlmeval_tsv"])
    v.set_defaults(func=_cmd_data_validate)

    for register in _subcommand_registrars():
        register(sub)
    return parser


def _subcommand_registrars():
    """Phase packages add their own subcommands; a missing optional one is simply absent."""
    import importlib

    out = []
    for module in ("rewards.cli", "sft.cli", "rl.cli", "embed.cli", "patho.eval.cli", "launch.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        out.append(mod.register)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (PathoError, FileNotFoundError) as exc:
        # Bad input is reported in one line; tracebacks are for bugs.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

