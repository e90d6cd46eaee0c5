"""Typed configs of the curate stages and of the `curate` phase that chains them.

    phases:
      - name: curate
        type: curate
        config:
          stages:
            - {stage: import, sources: [{format: quilt-1m, path: "{data}/raw/quilt_1M_lookup.csv"}]}
            - {stage: dedup}
            - {stage: decontaminate, against: ["{data}/eval/PathoSynth_MCQ.tsv"]}
            - {stage: tag, seed: "{data}/raw/subfield_seed.csv"}
            - {stage: cluster}

Each stage writes `OUTPUT_DIR/NN-<stage>/` and reads the folder of the stage before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from patho_r1.config import PhaseConfig, StrictModel, paths_deferred
from patho_r1.llm import EndpointConfig

SUBFIELDS = ("histopathology", "gross", "ihc", "cytology", "fish", "other")
GRID_SUBFIELDS = SUBFIELDS[:5]  # the prompt grid's; `other` holds diagrams and figure panels
LEVELS = ("easy", "medium", "hard")
Engine = Literal["auto", "local", "processes", "ray"]  # curate/engine.py: in process, a process pool, Ray Data
ENGINES = get_args(Engine)


class SourceSpec(StrictModel):
    format: str = Field(..., description="an import format (patho-r1 curate formats)")
    path: str
    images: str | None = Field(None, description="image folder, where the format names image files")
    columns: dict[str, str] = Field(default_factory=dict, description="csv/jsonl: our field -> their column")
    kind: Literal["caption", "mcq", "conversation"] | None = Field(None, description="csv/jsonl: the rows' kind")
    license: str | None = Field(None, description="overrides the license the format's dataset card states")
    name: str | None = Field(None, description="label for per-source counts (default: the format)")
    allow_outside_images: bool = Field(
        False, description="take image files that resolve outside the image folder (a `..` name, an absolute path "
        "elsewhere, a symbolic link out of it); refused by default, so a dataset's rows cannot pull in other files")

    @field_validator("format")
    @classmethod
    def _known(cls, v):
        from patho_r1.formats import all_formats

        if v not in all_formats():
            raise ValueError(f"unknown import format {v!r}; known: {', '.join(all_formats())}")
        return v

    @model_validator(mode="after")
    def _generic_needs_kind(self, info: ValidationInfo):
        if self.format in ("csv", "jsonl") and self.kind is None:
            raise ValueError("kind: the csv and jsonl formats need the kind of their rows")
        if not paths_deferred(info) and not Path(self.path).exists():
            raise ValueError(f"path: not found: {self.path}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.format

    def input_paths(self) -> list[str]:
        return [self.path] + ([self.images] if self.images else [])


class ImportStage(StrictModel):
    stage: Literal["import"] = "import"
    sources: list[SourceSpec] = Field(..., min_length=1)
    on_error: Literal["raise", "skip"] = Field("raise", description="skip: bad rows go to rejects.jsonl, with why")
    images: Literal["copy", "link"] = Field(
        "copy", description="link: hard-link image files into the store instead of copying them (same filesystem; "
        "copied otherwise): no second copy of the corpus and far faster, but editing a source image in place would "
        "change the stored one too")
    engine: Engine = "auto"


class _MinHashFields(StrictModel):
    threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard of word shingles for a near-duplicate")
    num_perm: int = Field(64, ge=16, le=512)
    shingle: int = Field(3, ge=1, le=8, description="words per shingle")

    def minhash(self):
        from patho_r1.curate.minhash import MinHashSpec

        return MinHashSpec(self.threshold, self.num_perm, self.shingle)


class DedupStage(_MinHashFields):
    stage: Literal["dedup"] = "dedup"
    near_text: bool = True
    exact_images: bool = True
    engine: Engine = "auto"


class DecontaminateStage(_MinHashFields):
    stage: Literal["decontaminate"] = "decontaminate"
    against: list[str] = Field(..., min_length=1, description="benchmark files (VLMEvalKit TSV) or curated "
                               "folders (`curate import` of a benchmark)")
    threshold: float = Field(0.7, gt=0, le=1, description="estimated Jaccard of word shingles for a match")
    min_words: int = Field(8, ge=1, description="texts shorter than this are not compared (generic questions "
                           "such as 'is this benign?' would match everything)")
    perceptual: bool = Field(True, description="also match re-encoded images by their difference hash")
    engine: Engine = "auto"
    max_hamming: int = Field(4, ge=0, le=12, description="dHash bits two pictures may differ by and still match")

    @model_validator(mode="after")
    def _exists(self, info: ValidationInfo):
        if not paths_deferred(info):
            for i, path in enumerate(self.against):
                if not Path(path).exists():
                    raise ValueError(f"against[{i}]: not found: {path}")
        return self


class EmbedderSpec(StrictModel):
    kind: Literal["features", "patho", "hf"] = Field(
        "features", description="features: colour/texture statistics + hashed caption words (no model); patho: our "
        "embedding head (model + adapter); hf: a Hugging Face image encoder (get_image_features)")
    model: str | None = None
    adapter: str | None = None
    batch_size: int = Field(64, gt=0)
    actors: int | None = Field(None, gt=0, description="Ray Data engine: embedding actors (None: an autoscaling "
                               "pool up to the cluster's CPUs, or GPUs)")
    gpus_per_actor: float = Field(0.0, ge=0, description="Ray Data engine: GPUs each embedding actor holds")

    def identity(self) -> dict:
        """What decides the vectors (not the resources that compute them)."""
        return {"kind": self.kind, "model": self.model, "adapter": self.adapter}

    @model_validator(mode="after")
    def _needs_model(self):
        if self.kind != "features" and not self.model:
            raise ValueError(f"model: the {self.kind} embedder needs a model path")
        return self


class TagStage(StrictModel):
    stage: Literal["tag"] = "tag"
    seed: str | None = Field(None, description="CSV or JSONL of hand labels: id, subfield")
    corrections: list[str] = Field(default_factory=list, description="reviewed CSVs (review.csv with the "
                                   "subfield column corrected); they join the seed labels")
    keyword_labels: bool = Field(True, description="caption keyword rules as weak labels to bootstrap")
    max_weak_per_class: int = Field(20_000, gt=0, description="keyword labels used per subfield (the first ones)")
    holdout_fraction: float = Field(0.3, ge=0, lt=1, description="share of the seed labels kept out of training "
                                    "to measure per-class precision and recall")
    review: int = Field(50, ge=0, description="write the K least confident rows to review.csv")
    embedder: EmbedderSpec = Field(default_factory=EmbedderSpec)
    engine: Engine = "auto"


class ClusterStage(StrictModel):
    stage: Literal["cluster"] = "cluster"
    k: int = Field(3, ge=2, le=10)
    criterion: Literal["term_density", "centroid_distance", "caption_length"] = Field(
        "term_density", description="how clusters are ordered easy -> hard: mean domain terms per caption word, "
        "mean distance to the subfield centroid, or mean caption length")
    sample: int = Field(200_000, gt=0, description="rows per subfield the K-means is fit on (the rest are assigned)")
    backend: Literal["auto", "sklearn", "faiss"] = Field("auto", description="auto: faiss past a million rows")
    truth: str | None = Field(None, description="a CSV of id, difficulty (the synthetic world's hidden attribute): "
                              "the report gives the adjusted Rand index against it")
    embedder: EmbedderSpec = Field(default_factory=EmbedderSpec)
    engine: Engine = "auto"


def _labels_exist(paths: list[str | None], info: ValidationInfo) -> None:
    if not paths_deferred(info):
        for path in paths:
            if path and not Path(path).exists():
                raise ValueError(f"not found: {path}")


class GenerateStage(StrictModel):
    """Teacher chain-of-thought: each selected caption row, through its grid cells, to an OpenAI-compatible
    endpoint; appended to `generations.jsonl`, keyed by (record id, prompt id), so a re-run asks only what is
    missing."""

    stage: Literal["generate"] = "generate"
    endpoint: EndpointConfig
    tasks: list[Literal["mcq", "description", "reasoning", "conversation"]] = Field(
        default_factory=lambda: ["mcq", "description", "reasoning", "conversation"], min_length=1)
    tasks_per_record: int | None = Field(None, ge=1, le=4, description="draw this many of `tasks` per record "
                                         "(seeded); None: every task")
    task_weights: dict[str, float] = Field(default_factory=dict, description="with tasks_per_record: how likely "
                                           "each task is drawn (default: equally); e.g. {mcq: 4} favours MCQs")
    fraction: float = Field(1.0, gt=0, le=1, description="share of the records sent to the teacher, chosen by a "
                            "stable hash of their ids; the rest are left for the RL MCQs")
    limit: int | None = Field(None, gt=0, description="at most this many requests")
    prompts: str | None = Field(None, description="a folder of template overrides laid out like curate/prompts")
    with_image: bool = Field(False, description="send the image too (a VLM teacher); text-only by default, as the "
                             "Patho-R1 paper found better")
    labels: str | None = Field(None, description="CSV or JSONL of id, diagnosis: the gold the answer check uses "
                               "(else each row's `diagnosis` field, where it has one)")
    other_subfield: str | None = Field(None, description="the grid subfield for rows tagged outside the grid (e.g. "
                                       "`other`); None: such rows are skipped, and counted")
    default_level: Literal["easy", "medium", "hard"] = Field("medium", description="for rows with no difficulty")
    n_options: int = Field(4, ge=2, le=6)
    min_turns: int = Field(2, ge=1)
    max_turns: int = Field(4, ge=1)

    def identity(self, grid_digest: str) -> dict:
        return {**self.model_dump(mode="json", exclude={"endpoint"}), "endpoint": self.endpoint.identity(),
                "grid": grid_digest}

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if self.min_turns > self.max_turns:
            raise ValueError("min_turns: more than max_turns")
        unknown = sorted(set(self.task_weights) - set(self.tasks))
        if unknown or any(w <= 0 for w in self.task_weights.values()):
            raise ValueError(f"task_weights: weights must be > 0 and for tasks in `tasks` (not {unknown})")
        if self.other_subfield is not None and self.other_subfield not in GRID_SUBFIELDS:
            raise ValueError(f"other_subfield: not a grid subfield ({', '.join(GRID_SUBFIELDS)})")
        _labels_exist([self.labels, self.prompts], info)
        return self


class FilterStage(StrictModel):
    """Rule filters over teacher outputs; kept rows become our `conversation` kind (`kept.jsonl`)."""

    stage: Literal["filter"] = "filter"
    input: str | None = Field(None, description="a JSONL of teacher outputs (id, response, ...); default: the "
                              "parent stage's generations.jsonl")
    rules: list[str] = Field(default_factory=lambda: list(_BUILTIN_RULES), description="filter rules, in order")
    min_tokens: int = Field(16, ge=0)
    max_tokens: int = Field(8192, gt=0)
    tokenizer: str | None = Field(None, description="a local Hugging Face tokenizer for the length rule (default: "
                                  "a words-and-punctuation count, close to BPE tokens for English)")
    ngram: int = Field(4, ge=2, le=10)
    max_ngram_repeat: float = Field(0.3, gt=0, le=1, description="largest share of repeated word n-grams")
    min_words_for_ratio: int = Field(20, ge=1, description="shorter texts skip the n-gram ratio")
    max_sentence_repeats: int = Field(3, ge=2, description="a sentence (3+ words) said this often is a loop")
    max_foreign_chars: int = Field(0, ge=0, description="foreign-script characters allowed (CJK, Cyrillic, ...)")
    min_turns: int = Field(2, ge=1)
    max_turns: int = Field(4, ge=1)
    near_duplicate_threshold: float = Field(0.9, gt=0, le=1)
    num_perm: int = Field(32, ge=16, le=256)
    shingle: int = Field(3, ge=1, le=8)
    system_prompt: str | None = Field(None, description="a system turn for every kept conversation")
    examples: int = Field(3, ge=0, description="examples per rule and subfield in the report")

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, v):
        from patho_r1.curate.filters import FILTERS

        unknown = [r for r in v if r not in FILTERS]
        if unknown:
            raise ValueError(f"unknown filter rule(s) {unknown}; registered: {', '.join(FILTERS)}")
        return v

    @model_validator(mode="after")
    def _exists(self, info: ValidationInfo):
        _labels_exist([self.input], info)
        return self


class MCQStage(StrictModel):
    """Diagnosis-oriented RL MCQs from captions the SFT data did not use, stratified, with balanced letters."""

    stage: Literal["mcq"] = "mcq"
    n: int = Field(10_000, gt=0)
    source: Literal["teacher", "rules"] = Field("rules", description="teacher: the grid's mcq cells; rules: "
                                                "distractors from other diagnoses of the same tissue system")
    endpoint: EndpointConfig | None = Field(None, description="source teacher: the endpoint")
    pool: str | None = Field(None, description="curated folder of caption rows to draw from (default: the "
                             "nearest ancestor stage that holds caption.jsonl)")
    exclude: list[str] = Field(default_factory=list, description="SFT data (JSONL or stage folders) whose images "
                               "and captions the MCQs must not share; the parent filter stage's kept.jsonl always")
    labels: str | None = Field(None, description="CSV or JSONL of id, diagnosis[, tissue_system]")
    subfields: list[str] = Field(default_factory=lambda: list(GRID_SUBFIELDS), description="subfields to draw "
                                 "from (default: the grid's five; `other` holds diagrams and figure panels)")
    n_options: int = Field(4, ge=2, le=6)
    prompts: str | None = None
    with_image: bool = False
    default_level: Literal["easy", "medium", "hard"] = "medium"
    question: str = Field("What is the most likely diagnosis?", description="source rules: the question")
    teacher_distractors: Literal["balance", "keep"] = Field(
        "balance", description="source teacher: `balance` re-draws each question's distractors from the answers of "
        "the other questions, in proportion to how often each is an answer (same tissue system first), so no option "
        "text gives the answer away; `keep` keeps the teacher's own, which fails the no-image check when the "
        "teacher draws distractors uniformly")
    heldout: float = Field(0.1, ge=0, lt=1, description="share written to heldout.jsonl for the RL phase's "
                           "held-out accuracy")

    def identity(self, grid_digest: str) -> dict:
        # what the teacher is asked; how its distractors are used afterwards does not change its replies
        data = self.model_dump(mode="json", exclude={"endpoint", "teacher_distractors"})
        return {**data, "endpoint": self.endpoint.identity() if self.endpoint else None, "grid": grid_digest}

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if self.source == "teacher" and self.endpoint is None:
            raise ValueError("endpoint: source teacher needs an endpoint")
        _labels_exist([self.labels, self.pool, self.prompts, *self.exclude], info)
        return self


class WSIStage(StrictModel):
    """Whole slides -> tiles at chosen magnifications, multi-scale rows (a context tile and detail tiles inside it)
    and, where a slide has a GeoJSON of regions, grounding rows with boxes (`curate/wsi.py`)."""

    stage: Literal["wsi"] = "wsi"
    slides: str = Field(..., description="a slide file, or a folder searched for slides (SVS, NDPI, MRXS, SCN, "
                        "tiled TIFF...)")
    annotations: str | None = Field(None, description="a folder of GeoJSON files, one per slide named after it "
                                    "(`<slide stem>.geojson`, QuPath's export); default: beside each slide")
    mpp: list[float] | None = Field(None, min_length=1, description="microns per pixel of the tiles, one grid per "
                                    "value (default [0.5], about 20x); a slide that states none is refused")
    levels: list[int] | None = Field(None, min_length=1, description="tile these pyramid levels as they are "
                                     "instead of by microns per pixel (slides without MPP)")
    mpp_tolerance: float = Field(0.05, ge=0, lt=0.5, description="a level within this share of an asked MPP is "
                                 "read as stored (a scanner's 0.2527 um/px for 0.25); else the next finer level is "
                                 "resized")
    tile: int = Field(224, ge=16, le=4096, description="tile side in pixels")
    min_tissue: float = Field(0.5, ge=0, le=1, description="share of a tile's footprint that must be tissue")
    details: int = Field(4, ge=0, description="multi-scale rows: detail tiles of the finest scale per tile of the "
                         "coarsest (the most tissue first); 0 or one scale: none")
    min_box: float = Field(4.0, ge=0, description="grounding: boxes under this many tile pixels wide or high are "
                           "dropped")
    thumbnail: int = Field(2048, ge=64, le=16384, description="longer side of the thumbnail tissue is found on")
    on_error: Literal["raise", "skip"] = Field("raise", description="skip: a bad slide goes to rejects.jsonl with "
                                               "its one-line reason")
    engine: Engine = "auto"

    @field_validator("mpp")
    @classmethod
    def _positive(cls, v):
        if v is not None and (any(m <= 0 for m in v) or len(set(v)) != len(v)):
            raise ValueError("microns per pixel must be > 0 and given once each")
        return v

    @model_validator(mode="after")
    def _one_way(self, info: ValidationInfo):
        if self.mpp is not None and self.levels is not None:
            raise ValueError("mpp: give mpp or levels, not both")
        if self.levels is not None and (min(self.levels) < 0 or len(set(self.levels)) != len(self.levels)):
            raise ValueError("levels: levels are >= 0 and given once each")
        _labels_exist([self.slides, self.annotations], info)
        return self

    def tiling(self) -> dict:
        """What decides a slide's tiles and rows (not how errors are handled, nor where the work runs)."""
        return self.model_dump(mode="json", exclude={"slides", "annotations", "on_error", "engine"})


_BUILTIN_RULES = ("tags", "truncation", "length", "repetition", "language_mix", "answer_consistency",
                  "near_duplicate")

Stage = Annotated[ImportStage | DedupStage | DecontaminateStage | TagStage | ClusterStage | GenerateStage
                  | FilterStage | MCQStage | WSIStage, Field(discriminator="stage")]


class CuratePhaseConfig(PhaseConfig):
    """A chain of curate stages; `input` starts the chain at an existing stage folder instead of an import."""

    input: str | None = Field(None, description="a curated folder the first stage reads (when it is not import)")
    stages: list[Stage] = Field(..., min_length=1)
    parallel_threshold: int = Field(50_000, gt=0, description="engine auto: from this many rows, Ray Data (8+ "
                                    "CPUs) or a process pool (2+ cores); in process below it")

    @model_validator(mode="after")
    def _chain(self, info: ValidationInfo):
        from patho_r1.curate.stages import get_stage

        first = self.stages[0].stage
        if get_stage(first).parent != "none" and self.input is None:  # import and wsi read no stage folder
            raise ValueError(f"stages.0: a chain must start with import, or give `input` for its {first} stage")
        for i, stage in enumerate(self.stages[1:], start=1):
            if stage.stage == "import":
                raise ValueError(f"stages.{i}: import can only be the first stage")
        if self.input and not paths_deferred(info) and not Path(self.input).is_dir():
            raise ValueError(f"input: not a folder: {self.input}")
        return self

    def stage_dirs(self) -> list[Path]:
        return [Path(self.output_dir) / f"{i:02d}-{s.stage}" for i, s in enumerate(self.stages, start=1)]
