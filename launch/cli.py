"""The `patho-r1` command line: the root parser, the orchestration commands (`run`, `submit`), one phase alone
(`phase TYPE CONFIG.yaml`, with its aliases `cpt`, `sft`, `rl`, `embed train`, `clip train`) and the utilities
(`tiny-model`, `synth-data`, `data validate`).

It sits on the top floor: it imports each phase's subcommands by name (`patho_r1.sft.cli`, ...), so every edge of the
import graph is visible, and hands them `add_phase_command` to register their aliases of `patho-r1 phase` (a phase
package may not import the phase table above it).  Those modules import their heavy dependencies inside the command
functions, so `patho-r1 --help` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from patho_r1.curate import cli as curate_cli
from patho_r1.embed import cli as embed_cli
from patho_r1.errors import PathoError
from patho_r1.eval import cli as eval_cli
from patho_r1.launch import rewards_cli
from patho_r1.launch.curate_phase import model_encoder
from patho_r1.launch.phases import PHASES, get_phase
from patho_r1.sft import cli as sft_cli


def _cmd_tiny_model(args) -> int:
    from patho_r1.fixtures.tiny import TinySpec, build_tiny_model

    if args.clip:
        from patho_r1.fixtures.tiny_clip import build_tiny_clip

        print(f"tiny CLIP written to {build_tiny_clip(args.out, seed=args.seed)}")
        return 0

    spec = TinySpec(hidden_size=args.hidden_size, num_hidden_layers=args.layers, seed=args.seed)
    out = build_tiny_model(args.out, spec)
    print(f"tiny Qwen2.5-VL written to {out}")
    return 0


def _cmd_synth_data(args) -> int:
    from patho_r1.fixtures.synth import WorldConfig, generate_world

    if args.public_formats:
        from patho_r1.errors import ConfigError
        from patho_r1.fixtures.public_formats import write_all

        out = Path(args.out)
        if out.exists() and any(out.iterdir()):  # the samples are written fresh, never over earlier files
            raise ConfigError(f"synth-data --public-formats: {out} is not empty; give a new or empty folder")
        print(json.dumps(write_all(out), indent=2))
        return 0

    cfg = WorldConfig(tile_size=args.tile_size, n_train_tiles=args.n_train_tiles, n_heldout_tiles=args.n_heldout_tiles)
    manifest = generate_world(args.out, seed=args.seed, config=cfg)
    print(json.dumps(manifest["files"], indent=2))
    return 0


def _cmd_data_validate(args) -> int:
    from patho_r1.data import DataError, iter_vlmeval_tsv, validate_file

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


def _memory_plan(plan, args, *, required: bool):
    """The planner's tables for a validated recipe; a phase that does not fit is an error unless --force.

    `required`: `patho-r1 plan` fails when the model's config cannot be found offline; `run` says so and goes on.
    """
    from patho_r1.errors import ConfigError
    from patho_r1.launch.planner import plan_recipe

    try:
        memory = plan_recipe(plan, gpu_name=getattr(args, "gpu", None), mfu=getattr(args, "mfu", 0.35))
    except ConfigError as exc:
        if required:
            raise
        print(f"warning: memory plan skipped: {exc}", file=sys.stderr)
        return None
    if memory.misfits and not args.force:
        raise ConfigError(memory.error())
    return memory


def _cmd_plan(args) -> int:
    from patho_r1.launch.planner import check_data_kinds
    from patho_r1.launch.preflight import check_gpu_stack, describe_stack
    from patho_r1.launch.recipe import load_plan

    plan = load_plan(args.recipe)
    check_data_kinds(plan)  # an MCQ file given to SFT: one line naming the file, both kinds and the command
    stacks = check_gpu_stack(plan)  # a phase whose packages do not import is refused before its memory is planned
    memory = _memory_plan(plan, args, required=True)
    print(describe_stack(stacks))
    print(memory.describe())
    if memory.misfits:  # --force: shown, and said again at the end
        print(memory.error(), file=sys.stderr)
    return 0


def _cmd_run(args) -> int:
    from patho_r1.launch.planner import check_data_kinds
    from patho_r1.launch.preflight import check_gpu_stack, describe_stack
    from patho_r1.launch.recipe import load_plan
    from patho_r1.launch.runner import run_recipe, select_phases

    plan = load_plan(args.recipe)  # every field validated before anything starts
    phases = [p.strip() for p in args.phases.split(",")] if args.phases else None
    check_data_kinds(plan, select_phases(plan, phases))  # the first rows of each data file are the kind it reads
    stacks = check_gpu_stack(plan, select_phases(plan, phases))  # every package the phases import, before Ray
    memory = _memory_plan(plan, args, required=False)
    if args.dry_run:
        print(plan.describe())
        print(describe_stack(stacks))
        if memory is not None:
            print(memory.describe())
        return 0
    run_recipe(plan, phases=phases, resume=args.resume, verbose=args.verbose)
    return 0


def _cmd_report(args) -> int:
    from patho_r1.launch.report import write_report

    write_report(args.run_dir)
    print(f"report written: {args.run_dir}/report.md, report.html, plots/")
    return 0


def _cmd_submit(args) -> int:
    from patho_r1.launch.submit import submit

    return submit(args.recipe, address=args.address, phases=args.phases, resume=args.resume,
                  extra_pip=args.pip, wait=not args.no_wait, output_root=args.output_root,
                  stop_on_interrupt=args.stop_on_interrupt)


def _cmd_phase(args, phase_type: str, done: Callable | None = None) -> int:
    """One phase alone, in this process, from a YAML of its config (`patho-r1 phase TYPE CONFIG.yaml`)."""
    import yaml

    from patho_r1.config import load_config
    from patho_r1.errors import ConfigError
    from patho_r1.launch.planner import data_kind_problems
    from patho_r1.launch.report import phase_headline

    phase = get_phase(phase_type)
    overrides = {"resume": True} if getattr(args, "resume", False) else {}
    cfg = load_config(phase.config_class(), args.config, overrides)  # validated before any model is loaded
    problems = data_kind_problems(phase, cfg, f"{args.config}: ")
    if problems:
        raise ConfigError("\n".join(problems))
    if args.dry_run:
        cfg.check_inputs()
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
        print(f"{phase_type}: {args.config} is valid and its inputs are there; --dry-run: nothing run")
        return 0
    result = phase.run(cfg)
    if done is not None:
        done(cfg, result)
        return 0
    steps = f"{result.global_step} steps; " if result.global_step else ""
    where = "final model" if phase.writes_checkpoint else "output"
    print(f"{phase_type}: {steps}{where} in {result.model_dir}")
    numbers = phase_headline(getattr(cfg, "output_dir", result.model_dir), result.metrics, phase_type)
    if numbers:
        print(f"{phase_type}: {numbers}")
    return 0


def add_phase_command(sub, command: str, phase_type: str, done: Callable | None = None, help: str | None = None):
    """Register `command` under the subparsers `sub`: run one `phase_type` alone from a YAML of its config, as
    `patho-r1 phase TYPE` does.  `done(cfg, result)` prints the result (default: steps, output, the phase's
    numbers).  The phase packages' own commands (`patho-r1 sft`, `embed train`, ...) are these aliases."""
    phase = get_phase(phase_type)
    p = sub.add_parser(command, help=help or phase.summary or f"run a {phase_type} phase alone")
    p.add_argument("config", help=f"{phase_type} phase config YAML (the `config:` of a recipe's {phase_type} phase)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, check that its inputs exist and hold "
                   "the record kinds the phase reads, print it; run nothing")
    if phase.hf_trainer:
        p.add_argument("--resume", action="store_true", help="continue from the newest intermediate checkpoint")
    p.set_defaults(func=functools.partial(_cmd_phase, phase_type=phase_type, done=done))
    return p


def _register_phase(sub) -> None:
    p = sub.add_parser("phase", help="run one phase of any registered type alone, from a YAML of its config")
    types = p.add_subparsers(dest="phase_type", required=True, metavar="TYPE")
    for name in PHASES:
        add_phase_command(types, name, name)


def _register_run(sub) -> None:
    p = sub.add_parser("run", help="run a recipe (all phases, in order) on Ray")
    p.add_argument("recipe")
    p.add_argument("--phases", help="comma-separated phase names to run (default: all)")
    p.add_argument("--resume", action="store_true", help="skip completed phases, resume a half-done one")
    p.add_argument("--dry-run", action="store_true", help="validate, check that every phase's packages import "
                   "where it runs, and print the phase plan, resources and memory plan")
    p.add_argument("--force", action="store_true", help="run even if the memory planner says a phase does not fit")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="everything on the console (Ray, workers, libraries), as well as in OUTPUT_ROOT/logs/")
    p.set_defaults(func=_cmd_run)

    m = sub.add_parser("plan", help="per-GPU memory and step time of each phase of a recipe; an error when a "
                       "phase does not fit, naming the changes that would make it fit")
    m.add_argument("recipe")
    m.add_argument("--gpu", help="GPU to plan for (default: resources.gpu_type, else H100-80GB): "
                   "H100-80GB, H200, A100-80GB, A100-40GB, L40S")
    m.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation the step times assume")
    m.add_argument("--force", action="store_true", help="print the tables even when a phase does not fit (exit 0)")
    m.set_defaults(func=_cmd_plan)

    r = sub.add_parser("report", help="redraw a run's report and plots from its logged metrics")
    r.add_argument("run_dir", help="a recipe's output_root, e.g. runs/demo")
    r.set_defaults(func=_cmd_report)

    s = sub.add_parser("submit", help="submit a recipe to a Ray cluster as a Ray job")
    s.add_argument("recipe")
    s.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://head:8265")
    s.add_argument("--phases")
    s.add_argument("--resume", action="store_true")
    s.add_argument("--pip", action="append", default=[], help="extra pip requirement for the job's runtime env")
    s.add_argument("--output-root", help="where the run writes, an absolute path on storage every node shares "
                   "(default: the recipe's output_root, which must then be absolute)")
    s.add_argument("--no-wait", action="store_true", help="return after submission instead of tailing the logs")
    s.add_argument("--stop-on-interrupt", action="store_true",
                   help="Ctrl-C stops the job too (default: the job keeps running; the command says how to follow it)")
    s.set_defaults(func=_cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patho-r1", description="Train Qwen2.5-VL into a pathology reasoner (CPT -> CoT SFT -> GRPO/DAPO) and a "
        "retrieval embedder; evaluate it.  `patho-r1 run RECIPE` runs a whole recipe on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; `run`: everything on the console")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="build a tiny random-init Qwen2.5-VL + tokenizer + processor (no network)")
    p.add_argument("out", help="output directory")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", action="store_true", help="instead: a tiny random-init CLIP (PathoCLIP's CPU stand-in)")
    p.set_defaults(func=_cmd_tiny_model)

    p = sub.add_parser("synth-data", help="generate the synthetic pathology world (all dataset kinds)")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=56)
    p.add_argument("--n-train-tiles", type=int, default=600)
    p.add_argument("--n-heldout-tiles", type=int, default=120)
    p.add_argument("--public-formats", action="store_true",
                   help="instead: tiny samples in each public release's own layout (PathMMU, PathVQA, ...)")
    p.set_defaults(func=_cmd_synth_data)

    p = sub.add_parser("data", help="dataset utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    v = data_sub.add_parser("validate", help="validate a data file; errors name the file, row and field")
    v.add_argument("file")
    v.add_argument("--kind", required=True, choices=["caption", "conversation", "mcq", "embed_pair", "vlmeval_tsv"])
    v.set_defaults(func=_cmd_data_validate)

    _register_run(sub)
    _register_phase(sub)
    rewards_cli.register(sub)
    sft_cli.register(sub, add_phase_command)  # cpt, sft
    add_phase_command(sub, "rl", "rl")  # patho-r1 rl CONFIG: an alias of patho-r1 phase rl CONFIG
    embed_cli.register(sub, add_phase_command)  # embed train, embed eval
    embed_cli.register_clip(sub, add_phase_command)  # clip train, clip eval
    eval_cli.register(sub)
    curate_cli.register(sub, model_encoder=model_encoder)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # `run` routes logging itself (to the run's log files)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (PathoError, FileNotFoundError) as exc:
        # Bad input is reported in one line; tracebacks are for bugs.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

