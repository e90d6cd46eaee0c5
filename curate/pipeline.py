"""Run one curate stage, or a chain of them, with resume, atomic output folders and manifests.

`run_stage(stage, parent, out)` is what `patho-r1 curate <stage>` calls; `run_chain(cfg)` is the `curate` phase.
A stage whose folder holds a complete manifest with the same config hash over the same input digests is skipped
(resume); anything else is written into a temporary sibling and swapped in by one rename, except the stages that
talk to a teacher (generate, mcq): they append each reply to their folder as it arrives, so a killed run resumes
where it stopped, and their manifest, written last, is what marks them finished.
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
from patho_r1.curate.config import CuratePhaseConfig, GenerateStage, ImportStage, MCQStage
from patho_r1.curate.engine import choose_engine
from patho_r1.curate.store import MANIFEST, StageManifest, StageWriter, input_digest, is_done, read_stage_manifest
from patho_r1.errors import ConfigError
from patho_r1.outputs import check_output_folder
from patho_r1.progress import RowProgress


def _stage_inputs(stage, parent: Path | None) -> dict[str, str]:
    paths: list[str] = []
    if parent is not None:
        paths.append(str(parent))
    if isinstance(stage, ImportStage):
        for s in stage.sources:
            paths += [s.path] + ([s.images] if s.images else [])
    for name in ("against", "corrections", "exclude"):
        paths += list(getattr(stage, name, []) or [])
    for name in ("seed", "truth", "labels", "input", "pool", "prompts"):
        if getattr(stage, name, None):
            paths.append(getattr(stage, name))
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
    if isinstance(stage, GenerateStage | MCQStage):
        from patho_r1.curate.grid import PromptGrid

        grid = PromptGrid(Path(stage.prompts) if stage.prompts else None)
        return config_hash({**stage.identity(grid.digest()), "seed": seed})
    return config_hash({**config, "seed": seed})


def _appends(stage) -> bool:
    return isinstance(stage, GenerateStage) or (isinstance(stage, MCQStage) and stage.source == "teacher")


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
    out = Path(out).resolve()
    parent = Path(parent).resolve() if parent is not None else None
    n_rows = _parent_rows(parent) if parent is not None else 0  # first: a wrong folder fails here, by name
    replace = check_stage_output(stage, out, overwrite)  # before any work: a wrong --out fails in a second
    config = stage.model_dump(mode="json")
    cfg_hash = _config_hash(stage, config, seed)
    inputs = _stage_inputs(stage, parent)
    if dry_run:
        from patho_r1.curate.generate import run_generate

        counts = run_generate(stage, parent, out, None, RowProgress(stage.stage), seed, resume, dry_run=True)
        return StageManifest(stage=stage.stage, config=config, config_hash=cfg_hash, inputs=inputs, counts=counts,
                             complete=False)
    if resume and is_done(out, cfg_hash, inputs):
        return read_stage_manifest(out)
    if isinstance(stage, ImportStage):
        from patho_r1.curate.importer import estimate_total

        total = estimate_total(stage)
    else:
        total = n_rows
    chosen = choose_engine(engine or getattr(stage, "engine", "local"), total or 0, parallel_threshold)
    progress = RowProgress(stage.stage, total, metrics_file=metrics_file, show=show_progress)
    t0 = time.time()
    with (_in_place(out, replace) if _appends(stage) else atomic_directory(out)) as tmp:
        writer = StageWriter(tmp)
        try:
            counts = _dispatch(stage, parent, tmp, out, writer, progress, chosen, n_rows, seed, model_encoder,
                               resume)
        finally:
            files = writer.close()
            seconds = progress.close()
        if _appends(stage):
            from patho_r1.curate.generate import GENERATIONS

            files[GENERATIONS] = file_sha256(tmp / GENERATIONS)
        complete = bool(counts.pop("complete", True))
        manifest = StageManifest(stage=stage.stage, config=config, config_hash=cfg_hash, inputs=inputs,
                                 parent=str(parent) if parent else None, files=files, seconds=round(seconds, 2),
                                 complete=complete,
                                 counts={"kinds": writer.kind_counts() or counts.pop("kinds", {}), "engine": chosen,
                                         "rows_per_s": round(progress.done / max(time.time() - t0, 1e-9), 1),
                                         **{k: v for k, v in writer.counts.items() if k.startswith("rows.")},
                                         **counts})
        tmp_manifest = tmp / f".{MANIFEST}.tmp"
        tmp_manifest.write_text(manifest.model_dump_json(indent=2) + "\n")
        os.replace(tmp_manifest, tmp / MANIFEST)
    return manifest


def _dispatch(stage, parent, tmp, final, writer, progress, engine, n_rows, seed, model_encoder, resume) -> dict:
    if stage.stage == "import":
        from patho_r1.curate.importer import import_sources

        return {"sources": import_sources(stage, tmp, writer, progress, engine)}
    if stage.stage == "dedup":
        from patho_r1.curate.dedup import run_dedup

        return run_dedup(stage, parent, tmp, final, writer, progress, engine, n_rows)
    if stage.stage == "decontaminate":
        from patho_r1.curate.decontaminate import run_decontaminate

        return run_decontaminate(stage, parent, tmp, final, writer, progress, engine)
    if stage.stage == "tag":
        from patho_r1.curate.tag import run_tag

        return run_tag(stage, parent, tmp, final, writer, progress, engine, n_rows, seed, model_encoder)
    if stage.stage == "cluster":
        from patho_r1.curate.cluster import run_cluster

        return run_cluster(stage, parent, tmp, final, writer, progress, engine, n_rows, seed, model_encoder)
    if stage.stage == "generate":
        from patho_r1.curate.generate import run_generate

        return run_generate(stage, parent, tmp, writer, progress, seed, resume)
    if stage.stage == "filter":
        from patho_r1.curate.filter_stage import run_filter

        source = filter_source(stage, parent)
        progress.total = progress.total or None
        counts = run_filter(stage, source, tmp, writer, progress)
        return {**counts, "kinds": {"conversation": counts["kept"]}}
    from patho_r1.curate.mcq import run_mcq

    return run_mcq(stage, parent, tmp, writer, progress, seed, resume)


def filter_source(stage, parent: Path | None) -> Path:
    """The teacher outputs a filter stage reads: its `input`, else the parent stage's generations.jsonl."""
    if stage.input:
        return Path(stage.input).resolve()
    from patho_r1.curate.generate import GENERATIONS

    if parent is None or not (parent / GENERATIONS).is_file():
        raise ConfigError(f"filter: no input; give `input` (a JSONL of teacher outputs) or run it after a generate "
                          f"stage ({parent or 'no parent'} holds no {GENERATIONS})")
    return parent / GENERATIONS


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
