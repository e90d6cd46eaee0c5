"""Typed config of the embedding phase: stage 1 (text), stage 2 (image-text curriculum), filtering, evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from patho.config import LoraSpec, StrictModel, WandbConfig, check_model_reference, paths_deferred
from patho.errors import ConfigError


class CurriculumStep(StrictModel):
    data: str = Field(..., description="embedding-pair JSONL (query/positive)")
    epochs: float = Field(1.0, gt=0)
    max_pairs: int | None = Field(None, gt=0)


class StageConfig(StrictModel):
    curriculum: list[CurriculumStep] = Field(..., min_length=1, description="datasets in order, each with epochs")
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=2, description="contrastive batch (in-batch negatives) per rank")
    grad_cache_chunk: int | None = Field(None, gt=0, description="GradCache chunk; None = plain backward")
    max_steps: int | None = Field(None, gt=0, description="cap on optimizer steps for the whole stage")


class StainAugmentConfig(StrictModel):
    hed_sigma: float = Field(0.05, ge=0, le=1)
    hed_bias: float = Field(0.05, ge=0, le=1)


class BootstrapConfig(StrictModel):
    """Score every pair of `data` with the trained embedder; keep those with similarity >= threshold."""

    data: str
    threshold: float = Field(0.3, ge=-1, le=1, description="lambda")
    output: str | None = Field(None, description="default: <output_dir>/filtered/<name>")


class EmbedEvalConfig(StrictModel):
    composed: str | None = Field(None, description="held-out composed queries JSONL")
    classification: str | None = Field(None, description="MCQ/labelled JSONL whose `category` is the class")
    batch_size: int = Field(32, gt=0)


class EmbedPhaseConfig(StrictModel):
    model: str
    output_dir: str
    temperature: float = Field(0.02, gt=0)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train_vision_tower: bool = False
    train_projector: bool = False
    stage1: StageConfig | None = Field(None, description="text-only pairs into the LoRA")
    stage2: StageConfig | None = Field(None, description="image-text pairs with a curriculum")
    stain_augment: StainAugmentConfig | None = None
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)
    bootstrap: BootstrapConfig | None = None
    eval: EmbedEvalConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    logging_steps: int = Field(10, gt=0)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    use_cpu: bool | None = None
    recipe_hash: str | None = None
    parent: str | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if self.stage1 is None and self.stage2 is None:
            raise ValueError("stage1: configure stage1, stage2 or both")
        if not paths_deferred(info):
            for field, path in self.input_paths().items():
                if not Path(path).exists():
                    raise ValueError(f"{field}: not found: {path}")
        return self

    def input_paths(self) -> dict[str, str]:
        out = {}
        for name in ("stage1", "stage2"):
            stage = getattr(self, name)
            for i, step in enumerate(stage.curriculum if stage else []):
                out[f"{name}.curriculum.{i}.data"] = step.data
        if self.bootstrap:
            out["bootstrap.data"] = self.bootstrap.data
        if self.eval and self.eval.composed:
            out["eval.composed"] = self.eval.composed
        if self.eval and self.eval.classification:
            out["eval.classification"] = self.eval.classification
        return out

    def check_inputs(self) -> None:
        check_model_reference("model", self.model)
        for field, path in self.input_paths().items():
            if not Path(path).exists():
                raise ConfigError(f"{field}: not found: {path}")
