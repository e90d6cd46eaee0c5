"""Run one curate stage, or a chain of them, with resume, atomic output folders and manifests.

`run_stage(stage, parent, out)` is what `patho-r1 curate <stage>` calls; `run_chain(cfg)` is the `curate` phase.
Both look the stage up in the stage table (`curate/stages.py`) for its runner, its inputs and how it writes.
A stage whose folder holds a complete manifest with the same config hash over the same input digests is skipped
(resume); anything else is written into a temporary sibling and swapped in by one rename, except the stages the
table marks `appends` (generate; mcq from a teacher): they append each reply to their folder as it arrives, so a
killed run resumes where it stopped, and their manifest, written last, is what marks them finished.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from patho_r1.checkpoint import atomic_directory, config_hash, file_sha256
from patho_r1.config import PhaseResult
from patho_r1.curate.config import CuratePhaseConfig
from patho_r1.curate.engine import choose_engine
from patho_r1.curate.stages import STAGES, StageContext, StageType, get_stage
from patho_r1.curate.store import MANIFEST, StageManifest, StageWriter, input_digest, is_done, read_stage_manifest
from patho_r1.errors import ConfigError
from patho_r1.outputs import check_output_folder
from patho_r1.progress import RowProgress


def _stage_inputs(stage, parent: Path | None) -> dict[str, str]:
    """Every input's digest: the parent folder's, then those of the files and folders the config names."""
    paths = ([str(parent)] if parent is not None else []) + get_stage(stage.stage).input_paths(stage)
    return {str(Path(p).resolve()): input_digest(p) for p in paths}


def _parent_rows(parent: Path) -> int:
    manifest = read_stage_manifest(parent)
    if manifest is None or not manifest.complete:
        raise ConfigError(f"{parent}: not a finished curate stage folder (no complete {MANIFEST}); run the stage "
                          "before it first")
    return int(sum(manifest.counts.get("kinds", {}).values()))


def _config_hash(stage, config: dict, seed: int) -> str:
    """What decides a stage's output.  Teacher stages hash the teacher's identity and the prompt templates, not the
    endpoint's address or concurrency: a server restarted on another port must not redo a finished run."""
    if get_stage(stage.stage).teacher:
        from patho_r1.curate.grid import PromptGrid

        grid = PromptGrid(Path(stage.prompts) if stage.prompts else None)
        return config_hash({**stage.identity(grid.digest()), "seed": seed})
    return config_hash({**config, "seed": seed})


def _appends(stage) -> bool:
    return get_stage(stage.stage).appends_in_place(stage)


def _is_ours(stage, out: Path) -> bool:
    """`out` is this stage's own output: its manifest says so (finished, or a teacher run's unfinished one), or a
    teacher run killed before its manifest left its run identity there (a re-run resumes it)."""
    manifest = read_stage_manifest(out)
    if manifest is not None:
        return manifest.stage == stage.stage
    if not _appends(stage):
        return False
    from patho_r1.curate.generate import IDENTITY

    return (out / IDENTITY).is_file()


def check_stage_output(stage, out: Path, overwrite: bool = False) -> bool:
    """Apply the output-folder rule (`patho_r1.outputs`) to a stage's folder; returns whether `out` holds something
    else that `overwrite` lets this stage replace."""
    ours = _is_ours(stage, out)
    check_output_folder(out, f"curate {stage.stage}", ours=ours, overwrite=overwrite)
    return not ours and out.is_dir() and any(out.iterdir())


@contextlib.contextmanager
def _in_place(out: Path, replace: bool = False):
    """The folder itself, for stages that append as they go (emptied first if `replace`: another command's files,
    with --overwrite); the old manifest goes first, so a crash never leaves new partial files under a manifest that
    says finished."""
    if replace:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(out / MANIFEST)
    yield out


def run_stage(stage, parent: Path | None, out: Path, *, engine: str | None = None, parallel_threshold: int = 50_000,
              seed: int = 0, show_progress: bool = False, metrics_file: Path | None = None,
              model_encoder: Callable | None = None, resume: bool = True, dry_run: bool = False,
              overwrite: bool = False) -> StageManifest:
    """Run one stage from `parent` (None for import, or a filter given an input file) into `out`; returns its
    manifest (with `dry_run`, a generate stage's request estimate, and nothing is sent or written).  `out` must be
    new, empty, or this stage's own output, unless `overwrite` (`patho_r1.outputs`)."""
    kind = get_stage(stage.stage)
    out = Path(out).resolve()
    parent = Path(parent).resolve() if parent is not None else None
    n_rows = _parent_rows(parent) if parent is not None else 0  # first: a wrong folder fails here, by name
    replace = check_stage_output(stage, out, overwrite)  # before any work: a wrong --out fails in a second
    config = stage.model_dump(mode="json")
    head = {"stage": stage.stage, "config": config, "config_hash": _config_hash(stage, config, seed),
            "inputs": _stage_inputs(stage, parent)}
    if dry_run:
        return _dry_run(kind, stage, StageContext(parent, out, out, None, RowProgress(stage.stage), seed=seed,
                                                  resume=resume, dry_run=True), head)
    if resume and is_done(out, head["config_hash"], head["inputs"]):
        return read_stage_manifest(out)
    total = kind.expected_rows(stage) if kind.estimate else n_rows
    chosen = choose_engine(engine or getattr(stage, "engine", "local"), total or 0, parallel_threshold)
    progress = RowProgress(stage.stage, total, metrics_file=metrics_file, show=show_progress)
    ctx = StageContext(parent, out, out, None, progress, chosen, n_rows, seed, resume, model_encoder=model_encoder)
    return _run_in_folder(kind, stage, ctx, replace, head)


def _dry_run(kind: StageType, stage, ctx: StageContext, head: dict) -> StageManifest:
    if not kind.dry_run:
        able = ", ".join(name for name, s in STAGES.items() if s.dry_run)
        raise ConfigError(f"curate {stage.stage}: no dry run (only {able} can estimate its work)")
    return StageManifest(**head, counts=kind.run(stage, ctx), complete=False)


def _run_in_folder(kind: StageType, stage, ctx: StageContext, replace: bool, head: dict) -> StageManifest:
    """Run the stage into a temporary folder swapped in by one rename (or into its folder, for a stage that appends
    as it goes), then write its manifest there, last."""
    t0 = time.time()
    appends = kind.appends_in_place(stage)
    with (_in_place(ctx.final, replace) if appends else atomic_directory(ctx.final)) as tmp:
        ctx.work, ctx.writer = tmp, StageWriter(tmp)
        try:
            counts = kind.run(stage, ctx)
        finally:
            files = ctx.writer.close()
            seconds = ctx.progress.close()
        if appends:
            from patho_r1.curate.generate import GENERATIONS

            files[GENERATIONS] = file_sha256(tmp / GENERATIONS)
        manifest = _manifest(head, ctx, counts, files, seconds, t0)
        manifest.write_to(tmp)
    return manifest


def _manifest(head: dict, ctx: StageContext, counts: dict, files: dict, seconds: float, t0: float) -> StageManifest:
    """The manifest of a finished run: `kinds` from the writer (else the runner's), the engine, the speed, the
    writer's row counts, then the runner's counts."""
    writer, progress = ctx.writer, ctx.progress
    complete = bool(counts.pop("complete", True))
    return StageManifest(**head, parent=str(ctx.parent) if ctx.parent else None, files=files,
                         seconds=round(seconds, 2), complete=complete,
                         counts={"kinds": writer.kind_counts() or counts.pop("kinds", {}), "engine": ctx.engine,
                                 "rows_per_s": round(progress.done / max(time.time() - t0, 1e-9), 1),
                                 **{k: v for k, v in writer.counts.items() if k.startswith("rows.")},
                                 **counts})


def run_chain(cfg: CuratePhaseConfig, *, model_encoder: Callable | None = None, show_progress: bool = False,
              ) -> PhaseResult:
    """The `curate` phase: each stage reads the folder of the one before it."""
    cfg.check_inputs()
    out_root = Path(cfg.output_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    metrics_file = out_root / "metrics.jsonl"
    parent = Path(cfg.input) if cfg.input else None
    summary = {}
    for stage, out in zip(cfg.stages, cfg.stage_dirs(), strict=True):
        manifest = run_stage(stage, parent, out, parallel_threshold=cfg.parallel_threshold, seed=cfg.seed,
                             metrics_file=metrics_file, model_encoder=model_encoder, show_progress=show_progress)
        summary[out.name] = manifest.counts
        parent = out
    return PhaseResult(model_dir=parent, metrics={"stages": summary, "final": str(parent)})
