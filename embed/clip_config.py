"""Typed config of the PathoCLIP phase: two training stages over caption files, the stage II anchor, evaluation."""

from __future__ import annotations

from pydantic import Field, model_validator

from patho_r1.config import PhaseConfig, StrictModel


class ClipStage(StrictModel):
    data: list[str] = Field(..., min_length=1, description="caption JSONL files (images + caption), mixed in one "
                            "shuffled pool: the data engine's caption.jsonl, a world's cpt/train.jsonl")
    epochs: float = Field(1.0, gt=0)
    max_pairs: int | None = Field(None, gt=0, description="cap on pairs read from each file")
    learning_rate: float = Field(5e-5, gt=0)
    vision_lr_scale: float = Field(1.0, gt=0, le=1, description="the image tower's learning rate as a share of "
                                   "learning_rate (stage II: below 1 keeps stage I's visual features)")
    anchor_weight: float = Field(0.0, ge=0, description="L2-SP: weight of sum((theta - theta_stage1)^2) over every "
                                 "trained weight, added to the loss (stage II only)")
    batch_size: int = Field(32, ge=2, description="contrastive batch (in-batch negatives) per rank")
    grad_cache_chunk: int | None = Field(None, gt=0, description="GradCache chunk; None = plain backward")
    max_steps: int | None = Field(None, gt=0)
    weight_decay: float = Field(0.1, ge=0)


class ClipEvalConfig(StrictModel):
    retrieval: str | None = Field(None, description="held-out caption JSONL: image <-> text retrieval")
    classification: str | None = Field(None, description="held-out labelled JSONL (MCQ rows; `category` is the "
                                       "class): zero-shot classification, and the few-shot probe's test set")
    few_shot_train: str | None = Field(None, description="labelled JSONL the few-shot probe draws its shots from")
    shots: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16])
    seeds: int = Field(10, gt=0)
    batch_size: int = Field(32, gt=0)


class ClipPhaseConfig(PhaseConfig):
    model: str = Field(..., description="a CLIP directory or hub id (openai/clip-vit-base-patch16, PLIP, ...)")
    stage1: ClipStage = Field(..., description="contrastive training on a morphology-rich corpus")
    stage2: ClipStage | None = Field(None, description="a mixed corpus, anchored to stage I's weights")
    eval: ClipEvalConfig | None = None
    logging_steps: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.stage1.anchor_weight:
            raise ValueError("stage1.anchor_weight: the anchor is to stage I's weights, so only stage2 has one")
        return self

    def input_paths(self) -> dict[str, str]:
        out = {}
        for name in ("stage1", "stage2"):
            stage = getattr(self, name)
            for i, path in enumerate(stage.data if stage else []):
                out[f"{name}.data.{i}"] = path
        for key in ("retrieval", "classification", "few_shot_train"):
            if self.eval and getattr(self.eval, key):
                out[f"eval.{key}"] = getattr(self.eval, key)
        return out
