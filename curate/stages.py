"""The stage table: every data-engine stage, with its config class, its runner, its inputs and its subcommand.

    STAGES["dedup"].config_class()     # -> DedupStage
    STAGES["dedup"].run(stage, ctx)    # -> the counts for the manifest

`pipeline.run_stage` (resume, output folders, manifests), the `curate` phase and `patho-r1 curate <stage>` all read
this table, and nothing else dispatches on a stage's name.  Config classes, runners and argument hooks are named by
import string, so building the command line imports no stage module (numpy, scikit-learn, the teacher client); a
runner is imported when its stage runs.

Every runner is `run(stage, ctx) -> dict`: `stage` is the validated config, `ctx` a `StageContext` (the parent
folder, the folder to write into, the final folder, the writer, the progress bar, the engine, the seed...).  Inside a
stage `ctx.work` is where files go (a temporary sibling of `ctx.final`, swapped in by one rename, or `ctx.final`
itself for a stage that appends in place); image paths in rows are made relative to `ctx.final`, where they will
be read.  The dict it returns becomes the manifest's `counts`: `kinds` (rows per kind, when the writer did not count
them) and `complete` (False: run again to finish) are read from it, the rest is kept as it is.

Adding a stage: its config class in `curate/config.py` (a `StrictModel` with `stage: Literal["sample"] = "sample"`,
added to the `Stage` union), its own module with the runner, and one registration here:

    # curate/sample.py
    def run_sample(stage: SampleStage, ctx: StageContext) -> dict:
        kept = 0
        for kind, file in stage_files(ctx.parent).items():
            for i, row in enumerate(iter_jsonl(file)):
                if i % stage.every == 0:
                    ctx.writer.row(kind, relative_images(row, ctx.parent, ctx.final))
                    kept += 1
                ctx.progress.advance(1)
        return {"kept": kept}

    def sample_arguments(q) -> Callable[[argparse.Namespace], dict]:
        q.add_argument("--every", type=int, default=10, help="keep one row in N")
        return lambda a: {"every": a.every}

    # curate/stages.py
    register_stage(StageType(
        "sample", "patho_r1.curate.config:SampleStage", "patho_r1.curate.sample:run_sample",
        help="every Nth row", arguments="patho_r1.curate.sample:sample_arguments"))

`patho-r1 curate sample PARENT --every 10 --out DIR` then exists, with --force, --overwrite and --seed, and the
stage runs in a `curate` recipe phase with resume and a manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from pkgutil import resolve_name  # "module:attribute" -> the object
from typing import Any, Literal


@dataclass
class StageContext:
    """What a stage runner gets besides its config."""

    parent: Path | None  # the stage folder this one reads (None: import, or a filter given `input`)
    work: Path  # where the stage writes its files: a temporary folder, or `final` for a stage that appends in place
    final: Path  # the stage's folder once finished: rows' image paths are made relative to it
    writer: Any = None  # a `store.StageWriter` on `work` (None in a dry run)
    progress: Any = None  # a `patho_r1.progress.RowProgress`
    engine: str = "local"  # where per-row work runs: local, processes or ray (`engine.choose_engine`)
    rows: int = 0  # rows in the parent folder (its manifest's count)
    seed: int = 0
    resume: bool = True  # a teacher stage keeps the replies already there; False moves them aside
    dry_run: bool = False  # estimate what the stage would do; send and write nothing
    model_encoder: Callable | None = None  # the top floor's factory for model embedders (tag, cluster)


@dataclass(frozen=True)
class StageType:
    name: str
    config: str  # "module:Class", the stage's pydantic config (a member of `curate.config.Stage`)
    runner: str  # "module:function", `run(stage, ctx: StageContext) -> dict` (the manifest's counts)
    help: str  # one line, for `patho-r1 curate --help`
    arguments: str | None = None  # "module:function", `(parser) -> (args -> dict)`: adds the subcommand's own flags
    # and returns what turns the parsed flags into the stage's config (without `stage`); None: no subcommand
    parent: Literal["required", "optional", "none"] = "required"  # the subcommand's positional parent folder
    parent_help: str = "the folder of the stage before"
    inputs: tuple[str, ...] = ()  # config fields naming input files or folders (a path, a list of them, or models
    # with `input_paths()`): their digests are part of what makes a finished stage up to date
    appends: bool | Callable[[Any], bool] = False  # writes into its folder as it goes (teacher replies), so a killed
    # run resumes; else it writes a temporary folder swapped in by one rename
    teacher: bool = False  # talks to a teacher: up to date by `stage.identity(grid digest)`, not by the whole config
    # (a server restarted on another port must not redo a finished run)
    estimate: str | None = None  # "module:function", `(stage) -> int | None`: the rows to expect (the progress
    # bar, the engine choice) when there is no parent folder to count them from
    dry_run: bool = False  # the runner honours `ctx.dry_run`

    def config_class(self) -> type:
        return resolve_name(self.config)

    def run(self, stage, ctx: StageContext) -> dict:
        return resolve_name(self.runner)(stage, ctx)

    def appends_in_place(self, stage) -> bool:
        return self.appends(stage) if callable(self.appends) else self.appends

    def input_paths(self, stage) -> list[str]:
        """The input files and folders `stage` names, in the order of `inputs`."""
        return [p for name in self.inputs for p in _paths(getattr(stage, name))]

    def expected_rows(self, stage) -> int | None:
        return resolve_name(self.estimate)(stage) if self.estimate else None

    def add_arguments(self, parser) -> Callable:
        return resolve_name(self.arguments)(parser)


def _paths(value) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [p for item in value for p in _paths(item)]
    return list(value.input_paths())


STAGES: dict[str, StageType] = {}


def register_stage(stage: StageType, *, overwrite: bool = False) -> StageType:
    if stage.name in STAGES and not overwrite:
        raise ValueError(f"stage {stage.name!r} is already registered")
    STAGES[stage.name] = stage
    return stage


def get_stage(name: str) -> StageType:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown curate stage {name!r}; known: {', '.join(STAGES)}") from None


_C, _A = "patho_r1.curate.config", "patho_r1.curate.cli_args"

register_stage(StageType(
    "import", f"{_C}:ImportStage", "patho_r1.curate.importer:run_import", parent="none", inputs=("sources",),
    estimate="patho_r1.curate.importer:estimate_total", arguments=f"{_A}:import_arguments",
    help="import a public corpus in its own format"))
register_stage(StageType(
    "dedup", f"{_C}:DedupStage", "patho_r1.curate.dedup:run_dedup", arguments=f"{_A}:dedup_arguments",
    help="exact image duplicates and near-duplicate texts (MinHash LSH)"))
register_stage(StageType(
    "decontaminate", f"{_C}:DecontaminateStage", "patho_r1.curate.decontaminate:run_decontaminate",
    inputs=("against",), arguments=f"{_A}:decontaminate_arguments",
    help="remove rows whose image or text is in an evaluation set"))
register_stage(StageType(
    "tag", f"{_C}:TagStage", "patho_r1.curate.tag:run_tag", inputs=("corrections", "seed"),
    arguments=f"{_A}:tag_arguments", help="subfield labels: a classifier on embeddings from a labelled seed"))
register_stage(StageType(
    "cluster", f"{_C}:ClusterStage", "patho_r1.curate.cluster:run_cluster", inputs=("truth",),
    arguments=f"{_A}:cluster_arguments", help="easy / medium / hard within each subfield (K-means)"))
register_stage(StageType(
    "generate", f"{_C}:GenerateStage", "patho_r1.curate.generate:run_generate", inputs=("labels", "prompts"),
    appends=True, teacher=True, dry_run=True, arguments=f"{_A}:generate_arguments",
    help="teacher chain-of-thought from captions through the prompt grid"))
register_stage(StageType(
    "filter", f"{_C}:FilterStage", "patho_r1.curate.filter_stage:run_filter", inputs=("input",),
    parent="optional", parent_help="a generate stage folder (or give --input)", arguments=f"{_A}:filter_arguments",
    help="rule filters over teacher outputs -> SFT conversations"))
register_stage(StageType(
    "mcq", f"{_C}:MCQStage", "patho_r1.curate.mcq:run_mcq", inputs=("exclude", "labels", "pool", "prompts"),
    appends=lambda stage: stage.source == "teacher", teacher=True, arguments=f"{_A}:mcq_arguments",
    help="stratified RL MCQs from captions the SFT data does not use"))
register_stage(StageType(
    "wsi", f"{_C}:WSIStage", "patho_r1.curate.wsi:run_wsi", parent="none", inputs=("slides", "annotations"),
    estimate="patho_r1.curate.wsi:count_slides", arguments=f"{_A}:wsi_arguments",
    help="whole slides -> tiles at chosen magnifications, multi-scale and grounding rows"))
