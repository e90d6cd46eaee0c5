"""`patho-r1 curate <stage>`: run one data-engine stage from the command line.

    patho-r1 curate formats
    patho-r1 curate import --format pathvqa path-vqa/data --out cur/01-import [--on-error skip] [--license STR]
    patho-r1 curate dedup cur/01-import --out cur/02-dedup
    patho-r1 curate decontaminate cur/02-dedup --against PathMMU_TEST.tsv --out cur/03-decon
    patho-r1 curate tag cur/03-decon --seed seed.csv [--corrections review.csv] --out cur/04-tag
    patho-r1 curate cluster cur/04-tag --out cur/05-cluster [--truth truth.csv]
    patho-r1 curate prompts [--list | --show CELL] [--prompts OVERRIDES]
    patho-r1 curate generate cur/05-cluster --base-url URL --model M --out cur/06-generate [--dry-run] [--limit N]
    patho-r1 curate filter --input cur/06-generate/generations.jsonl --out cur/07-filter
    patho-r1 curate mcq cur/07-filter --n 10000 --out cur/08-mcq [--source teacher --base-url URL --model M]

A stage whose output is already there, from the same config and inputs, is skipped (`--force` reruns it).  The
console shows a progress bar and one summary line; everything is in OUT/manifest.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from patho_r1.curate.cli_args import engine_option  # noqa: F401 (the --engine flag, for other commands)
from patho_r1.curate.stages import STAGES, StageType


def _summary(manifest) -> str:
    counts = manifest.counts
    kinds = ", ".join(f"{n} {k}" for k, n in counts.get("kinds", {}).items()) or "no rows"
    extra = []
    if counts.get("rows.rejects"):
        extra.append(f"{counts['rows.rejects']} rejected (rejects.jsonl)")
    if counts.get("rows.removed"):
        extra.append(f"{counts['rows.removed']} removed (removed.jsonl)")
    if "answered" in counts:
        extra.append(f"{counts['answered']} teacher replies ({counts.get('resumed', 0)} already there), "
                     f"{counts.get('prompt_tokens', 0):,} tokens in, {counts.get('completion_tokens', 0):,} out"
                     + (f", ${counts['cost_usd']}" if "cost_usd" in counts else ""))
    if "rejected_by_rule" in counts:
        extra.append(f"{counts['kept']} kept, {counts['rejected']} rejected (filter_report.md)")
    if "letters" in counts:
        b = counts.get("no_image") or {}
        extra.append(f"letters {counts['letters']}; best no-image rule {b.get('best')} vs chance {b.get('chance')}")
    if "adjusted_rand_index" in counts:
        extra.append(f"ARI vs truth {counts['adjusted_rand_index']}")
    if counts.get("holdout"):
        extra.append(f"held-out accuracy {counts['holdout'].get('accuracy')}")
    tail = f"; {'; '.join(extra)}" if extra else ""
    return f"{manifest.stage}: {kinds}{tail} in {manifest.seconds:.1f}s ({counts.get('rows_per_s', 0):,.0f} rows/s)"


def _run(args, stage, model_encoder) -> int:
    from pydantic import TypeAdapter, ValidationError

    from patho_r1.config import format_validation_error
    from patho_r1.curate.config import Stage
    from patho_r1.curate.pipeline import run_stage
    from patho_r1.errors import ConfigError

    parent = Path(args.input) if getattr(args, "input", None) else None  # import has none, filter may not

    try:
        validated = TypeAdapter(Stage).validate_python(stage)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=f"curate {stage['stage']}")) from None
    started = time.time()
    dry_run = getattr(args, "dry_run", False)
    manifest = run_stage(validated, parent, Path(args.out), engine=getattr(args, "engine", None),
                         show_progress=True, model_encoder=model_encoder, resume=not args.force, seed=args.seed,
                         dry_run=dry_run, overwrite=getattr(args, "overwrite", False))
    if dry_run:
        c = manifest.counts
        cost = f", at most ${c['est_max_cost_usd']:,.2f}" if c.get("est_max_cost_usd") is not None else ""
        print(f"generate (dry run): {c['requests']:,} requests, about {c['est_prompt_tokens']:,} prompt tokens and "
              f"at most {c['max_completion_tokens']:,} completion tokens{cost}; nothing sent")
        return 0
    if not manifest.complete:
        failures = Path(args.out) / "failures.jsonl"
        last = failures.read_text().splitlines()[-1:] if failures.is_file() else []
        print(_summary(manifest))
        print(f"{manifest.stage}: {manifest.counts.get('failed', 0)} requests failed after every retry "
              f"({failures}); run the same command again to retry them"
              + (f"\n  last error: {json.loads(last[0])['error']}" if last else ""))
        return 1
    if manifest.created < started:
        print(f"{manifest.stage}: up to date (same config and inputs), skipped; --force runs it again")
    print(_summary(manifest))
    print(f"  -> {Path(args.out).resolve()} (manifest.json)")
    return 0


def _cmd_formats(args) -> int:
    from patho_r1.formats import all_formats

    for fmt in all_formats().values():
        print(f"{fmt.name:12s} {fmt.summary}" + (f"  [license: {fmt.license}]" if fmt.license else ""))
    return 0


def register(sub, model_encoder=None) -> None:
    """`model_encoder`: the top floor's factory for model embedders (tag and cluster with `--embedder patho|hf`).
    One subcommand per stage in the stage table (`curate/stages.py`), plus `formats` and `prompts`."""
    names = []
    for name, stage in STAGES.items():
        names += ([_TOOLS_BEFORE[name][0]] if name in _TOOLS_BEFORE else []) + ([name] if stage.arguments else [])
    p = sub.add_parser("curate", help=f"the data engine: {', '.join(names)}")
    commands = p.add_subparsers(dest="curate_command", required=True)
    for name, stage in STAGES.items():
        if name in _TOOLS_BEFORE:
            _TOOLS_BEFORE[name][1](commands)
        if stage.arguments is not None:
            _add_stage_command(commands, stage, model_encoder)


def _add_stage_command(commands, stage: StageType, model_encoder) -> None:
    """`patho-r1 curate NAME`: the stage's own flags (its registration's `arguments`), then the parent folder,
    --out, --force, --overwrite and --seed."""
    q = commands.add_parser(stage.name, help=stage.help)
    to_config = stage.add_arguments(q)
    if stage.parent != "none":
        q.add_argument("input", help=stage.parent_help, **({"nargs": "?", "metavar": "parent"}
                                                          if stage.parent == "optional" else {}))
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--force", action="store_true", help="rerun even if the output is up to date")
    q.add_argument("--overwrite", action="store_true", help="write --out even if it is a folder holding files "
                   "that are not this command's output (they are deleted); without it such a folder, or a "
                   "path that is a file, is refused")
    q.add_argument("--seed", type=int, default=0,
                   help="random seed (held-out splits, K-means, task draws, MCQ sampling)")
    q.set_defaults(func=lambda a: _run(a, {"stage": stage.name, **to_config(a)}, model_encoder))


def _add_formats(commands) -> None:
    f = commands.add_parser("formats", help="list the import formats")
    f.set_defaults(func=_cmd_formats)


def _add_prompts(commands) -> None:
    q = commands.add_parser("prompts", help="the teacher prompt grid: 5 subfields x 3 levels x 4 tasks")
    q.add_argument("--list", action="store_true", help="list the 60 cells and the file each renders from")
    q.add_argument("--show", metavar="CELL", help="render one cell (subfield/level/task) with --caption")
    q.add_argument("--caption", default="H&E-stained section of colon showing gland-like rings lined by crowded "
                   "nuclei, consistent with adenocarcinoma.")
    q.add_argument("--prompts", help="a folder of overrides laid out like curate/prompts")
    q.set_defaults(func=_cmd_prompts)


# the subcommands that are not stages, each listed before the stage it serves
_TOOLS_BEFORE = {"import": ("formats", _add_formats), "generate": ("prompts", _add_prompts)}


def _cmd_prompts(args) -> int:
    from patho_r1.curate.grid import PromptGrid

    grid = PromptGrid(Path(args.prompts) if args.prompts else None)
    if args.show:
        if args.show not in grid.cells():
            print(f"prompts: no cell {args.show!r}; cells are subfield/level/task (see --list)")
            return 2
        print(grid.render(args.show, caption=args.caption))
        return 0
    problems = grid.check()
    if args.list:
        for cell in grid.cells():
            print(f"{cell:34s} {grid.source_of(cell)}")
    overridden = grid.overridden()
    print(f"{len(grid.cells())} cells" + (f"; overridden: {', '.join(overridden)}" if overridden else "")
          + f"; digest {grid.digest()}")
    for line in problems:
        print(f"  broken: {line}")
    return 1 if problems else 0
