"""Typed config of the embedding phase: stage 1 (text), stage 2 (image-text curriculum), filtering, evaluation."""

from __future__ import annotations

from pydantic import Field, model_validator

from patho_r1.config import LoraSpec, PhaseConfig, StrictModel


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


class EmbedPhaseConfig(PhaseConfig):
    model: str = Field(..., description="the backbone checkpoint (the reasoner) the adapter is trained on")
    temperature: float = Field(0.02, gt=0)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train_vision_tower: bool = False
    train_projector: bool = False
    gradient_checkpointing: bool = Field(False, description="recompute each layer in the backward pass: activations "
                                         "of the layer inputs only (`patho-r1 plan` shows the difference)")
    stage1: StageConfig | None = Field(None, description="text-only pairs into the LoRA")
    stage2: StageConfig | None = Field(None, description="image-text pairs with a curriculum")
    stain_augment: StainAugmentConfig | None = None
    bootstrap: BootstrapConfig | None = None
    eval: EmbedEvalConfig | None = None
    logging_steps: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.stage1 is None and self.stage2 is None:
            raise ValueError("stage1: configure stage1, stage2 or both")
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
