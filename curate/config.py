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
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from patho_r1.config import PhaseConfig, StrictModel, paths_deferred

SUBFIELDS = ("histopathology", "gross", "ihc", "cytology", "fish", "other")
LEVELS = ("easy", "medium", "hard")
Engine = Literal["auto", "local", "ray"]


class SourceSpec(StrictModel):
    format: str = Field(..., description="an import format (patho-r1 curate formats)")
    path: str
    images: str | None = Field(None, description="image folder, where the format names image files")
    columns: dict[str, str] = Field(default_factory=dict, description="csv/jsonl: our field -> their column")
    kind: Literal["caption", "mcq", "conversation"] | None = Field(None, description="csv/jsonl: the rows' kind")
    license: str | None = Field(None, description="overrides the license the format's dataset card states")
    name: str | None = Field(None, description="label for per-source counts (default: the format)")

    @field_validator("format")
    @classmethod
    def _known(cls, v):
        from patho_r1.curate.formats import FORMATS

        if v not in FORMATS:
            raise ValueError(f"unknown import format {v!r}; known: {', '.join(FORMATS)}")
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


Stage = Annotated[ImportStage | DedupStage | DecontaminateStage | TagStage | ClusterStage,
                  Field(discriminator="stage")]


class CuratePhaseConfig(PhaseConfig):
    """A chain of curate stages; `input` starts the chain at an existing stage folder instead of an import."""

    input: str | None = Field(None, description="a curated folder the first stage reads (when it is not import)")
    stages: list[Stage] = Field(..., min_length=1)
    ray_threshold: int = Field(50_000, gt=0, description="engine auto: Ray Data from this many rows, else in process")

    @model_validator(mode="after")
    def _chain(self, info: ValidationInfo):
        first = self.stages[0].stage
        if first != "import" and self.input is None:
            raise ValueError(f"stages.0: a chain must start with import, or give `input` for its {first} stage")
        for i, stage in enumerate(self.stages[1:], start=1):
            if stage.stage == "import":
                raise ValueError(f"stages.{i}: import can only be the first stage")
        if self.input and not paths_deferred(info) and not Path(self.input).is_dir():
            raise ValueError(f"input: not a folder: {self.input}")
        return self

    def stage_dirs(self) -> list[Path]:
        return [Path(self.output_dir) / f"{i:02d}-{s.stage}" for i, s in enumerate(self.stages, start=1)]
