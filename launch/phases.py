"""The phase table: every phase type a recipe can name, and every fact about it that the rest of the code needs.

    PHASES["sft"].config_class()   # -> SFTPhaseConfig
    PHASES["sft"].run(cfg)         # -> PhaseResult

Each `PhaseType` says, besides its config class and runner:

- how it runs: on Ray Train workers or as one Ray task (`ray_train`), as an HF-Trainer phase (`hf_trainer`: recipe
  `defaults` and `deepspeed` apply, `--resume` continues from its newest checkpoint), what it writes and reads
  (`writes_checkpoint`, `produces_model`, `uses_model`);
- what data it reads (`reads`: an input field of its config, as `input_paths()` names it, -> the record kind of
  `patho_r1.data` the rows must be), which `patho-r1 run --dry-run` and `patho-r1 phase` check on the first rows
  (`makes`: what makes such rows, where the kind's usual source in `KIND_SOURCES` would be the wrong advice);
- its memory plan (`plan`: a function from the phase to the planner's `Setup`; None: not planned, `not_planned`
  says why);
- its numbers (`headline`: the metrics.jsonl keys beside the progress bar; `result`: the line of numbers the run
  console prints when it ends, read from its output folder and final metrics);
- its standalone command: `patho-r1 phase TYPE CONFIG.yaml` runs any registered type; `summary` is its help.

The recipe schema, the planner, the runner, the workers, the run console's phase line and the standalone commands
all read this table; none of them names a phase type.  (The report's sections come from the files a phase wrote, a
summary.json, an eval/metrics.json, curate stage manifests, whatever its type.)  Config classes, runners and hooks
are named by import string ("module:attribute"), so looking a phase up never imports torch or TRL; a hook is imported
only where it is used.

Adding a phase type is one `register_phase` call (in the style of verl's `register_adv_est`) and its own module:

    # mypkg/distill.py
    class DistillConfig(TrainConfig):              # patho_r1.config: the HF-Trainer fields the planner reads
        data: str                                  # conversation JSONL
        teacher: str

        def input_paths(self) -> dict[str, str]:   # what `reads` names, and what the phase checks when it starts
            return {**super().input_paths(), "data": self.data}

    def run_distill(cfg: DistillConfig, callbacks=()) -> PhaseResult: ...

    # launch/phases.py, beside the built-in phases at its bottom
    register_phase(PhaseType(
        "distill", "mypkg.distill:DistillConfig", "mypkg.distill:run_distill", ray_train=True, hf_trainer=True,
        writes_checkpoint=True, produces_model=True, reads={"data": "conversation"},
        plan="patho_r1.launch.planner:trainer_setup", summary="distil a teacher's answers"))

Then a recipe may say `type: distill`, `patho-r1 phase distill distill.yaml [--dry-run]` runs it alone, and a
`data` file of MCQs fails at `patho-r1 run RECIPE --dry-run`, naming the command that makes conversations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pkgutil import resolve_name  # "module:attribute" -> the object
from typing import Any


@dataclass(frozen=True)
class PhaseType:
    name: str
    config: str  # "module:Class", a `patho_r1.config.PhaseConfig` subclass
    runner: str  # "module:function", `run(cfg[, callbacks]) -> PhaseResult`
    ray_train: bool  # runs on Ray Train workers (process group, placement group, restarts); else one Ray task
    hf_trainer: bool = False  # an HF-Trainer phase: recipe `defaults` and `deepspeed` apply, it takes callbacks and
    # resumes from its newest intermediate checkpoint when Ray restarts it (or `--resume` asks)
    writes_checkpoint: bool = False  # its final output is a checkpoint in OUTPUT_DIR/model, named by {phase:NAME}
    produces_model: bool = False  # that checkpoint is the next phase's default `model` (embed's adapter is not)
    uses_model: bool = True  # reads a model (the recipe's base or an earlier phase's); curate does not
    headline: tuple[str, ...] = ("loss",)  # the metrics.jsonl keys the console shows beside the progress bar
    summary: str = ""  # one line: the standalone command's help
    # input field (a key of the config's `input_paths()`, fnmatch patterns allowed) -> the record kind its rows are
    # (`patho_r1.data.RECORD_TYPES`); fields not named here are not checked
    reads: Mapping[str, str] = field(default_factory=dict, hash=False)
    makes: str = ""  # what makes its input, where the kind's usual source (KIND_SOURCES) would be the wrong advice
    plan: str | None = None  # "module:function", `(planned, shape, world, default_max_pixels) -> planner.Setup`
    not_planned: str = "not a training phase"  # why `plan` is None, in the planner's table
    result: str | None = None  # "module:function", `(out_dir: Path, metrics: dict) -> str`: the numbers of a
    # finished phase worth a console line (its final training loss is added for every phase that logs one)

    def config_class(self) -> type:
        return resolve_name(self.config)

    def run(self, cfg, callbacks=()):
        runner = resolve_name(self.runner)
        return runner(cfg, callbacks=callbacks) if self.hf_trainer else runner(cfg)

    def hook(self, name: str) -> Any:
        """The function a hook field names, imported now; None where the field is None."""
        target = getattr(self, name)
        return resolve_name(target) if target else None

    def kind_of(self, input_field: str) -> str | None:
        """The record kind an input field of this phase's config holds, or None (not checked)."""
        from fnmatch import fnmatchcase

        return next((kind for pattern, kind in self.reads.items() if fnmatchcase(input_field, pattern)), None)


PHASES: dict[str, PhaseType] = {}

# Record kind -> the command that makes it: the hint of a data file that holds the wrong kind.
KIND_SOURCES: dict[str, str] = {
    "caption": "`patho-r1 curate import` makes caption rows (caption.jsonl) from an image-caption corpus",
    "conversation": "`patho-r1 curate generate` then `patho-r1 curate filter` make conversations (kept.jsonl)",
    "mcq": "`patho-r1 curate mcq` makes MCQs (mcq.jsonl) from captions",
    "embed_pair": "embedding pairs are query/positive rows (`patho-r1 synth-data` writes examples under embed/)",
}


def register_phase(phase: PhaseType, *, overwrite: bool = False) -> PhaseType:
    if phase.name in PHASES and not overwrite:
        raise ValueError(f"phase type {phase.name!r} is already registered")
    PHASES[phase.name] = phase
    return phase


def get_phase(name: str) -> PhaseType:
    try:
        return PHASES[name]
    except KeyError:
        raise KeyError(f"unknown phase type {name!r}; known: {', '.join(PHASES)}") from None


_PLANNER = "patho_r1.launch.planner"
_REPORT = "patho_r1.launch.report"

register_phase(PhaseType(
    "cpt", "patho_r1.sft.config:CPTPhaseConfig", "patho_r1.sft.cpt:run_cpt", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="continued pretraining on image-caption pairs",
    reads={"data": "caption"}, plan=f"{_PLANNER}:trainer_setup"))
register_phase(PhaseType(
    "sft", "patho_r1.sft.config:SFTPhaseConfig", "patho_r1.sft.sft:run_sft", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="chain-of-thought SFT on conversations",
    reads={"data": "conversation"}, plan=f"{_PLANNER}:trainer_setup"))
register_phase(PhaseType(
    "rl", "patho_r1.rl.config:RLPhaseConfig", "patho_r1.rl.grpo:run_rl", ray_train=True, hf_trainer=True,
    writes_checkpoint=True, produces_model=True, summary="GRPO / DAPO reinforcement learning on MCQ prompts",
    headline=("reward", "rewards/accuracy/mean", "dynamic_sampling/filtered_frac"),
    reads={"data": "mcq"}, plan=f"{_PLANNER}:rl_setup"))
register_phase(PhaseType(
    "embed", "patho_r1.embed.config:EmbedPhaseConfig", "patho_r1.embed.train:run_embed", ray_train=True,
    writes_checkpoint=True, summary="the embedding head (a LoRA adapter beside the reasoner)",
    reads={"stage[12].curriculum.*.data": "embed_pair", "bootstrap.data": "embed_pair",
           "eval.composed": "embed_pair", "eval.classification": "mcq"},
    plan=f"{_PLANNER}:embed_setup", result=f"{_REPORT}:embed_result"))
register_phase(PhaseType(
    "clip", "patho_r1.embed.clip_config:ClipPhaseConfig", "patho_r1.embed.clip_train:run_clip", ray_train=True,
    writes_checkpoint=True, uses_model=False, summary="PathoCLIP: two-stage CLIP training on caption records",
    reads={"stage[12].data.*": "caption", "eval.retrieval": "caption", "eval.classification": "mcq",
           "eval.few_shot_train": "mcq"},
    not_planned="a separate CLIP model", result=f"{_REPORT}:clip_result"))
register_phase(PhaseType(
    "eval", "patho_r1.eval.phase:EvalPhaseConfig", "patho_r1.eval.phase:run_eval", ray_train=False, headline=(),
    summary="score checkpoints on an MCQ set", reads={"data": "mcq"},
    not_planned="inference only: the model's weights plus the engine's KV cache", result=f"{_REPORT}:eval_result"))
register_phase(PhaseType(
    "detection", "patho_r1.eval.detection_phase:DetectionPhaseConfig", "patho_r1.eval.detection_phase:run_detection",
    ray_train=False, headline=(), summary="score checkpoints on referring detection (F1@0.5, AP), paired",
    reads={"data": "mcq", "prior_from": "mcq"},  # grounding prompts in RL form: open-answer rows, boxes as answer
    makes="it reads grounding prompts in RL form, open-answer rows whose answer is the box JSON (as `python -m "
          "patho_r1.fixtures.grounding` writes them in rl/)",
    not_planned="inference only: the model's weights plus the engine's KV cache",
    result="patho_r1.eval.detection_phase:detection_result"))
register_phase(PhaseType(
    "curate", "patho_r1.curate.config:CuratePhaseConfig", "patho_r1.launch.curate_phase:run_curate", ray_train=False,
    uses_model=False, headline=(), summary="the data engine: import, dedup, decontaminate, tag, cluster",
    not_planned="no GPU training", result=f"{_REPORT}:curate_result"))
register_phase(PhaseType(
    "embed_bench", "patho_r1.embed.bench_phase:EmbedBenchConfig", "patho_r1.embed.bench_phase:run_embed_bench",
    ray_train=False, uses_model=False, headline=(), summary="an embedding suite (PMEB) over trained embedders",
    not_planned="inference only: one embedder at a time", result=f"{_REPORT}:embed_bench_result"))
