"""Typed configs of the two supervised phases."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from patho_r1.config import StrictModel, TrainConfig
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT


class AugmentConfig(StrictModel):
    """Stain augmentation applied to training images on the fly (HED jitter, Tellez et al. 2018)."""

    hed_sigma: float = Field(0.05, ge=0, le=1)
    hed_bias: float = Field(0.05, ge=0, le=1)


class _SupervisedConfig(TrainConfig):
    data: str = Field(..., description="JSONL/Parquet file or datasets directory")
    streaming: bool = Field(False, description="stream the data (requires max_steps)")
    augment: AugmentConfig | None = None
    packing: bool = Field(False, description="each micro-batch's samples end to end in one row, no padding "
                          "(sft/packing.py); the loss and gradients are those of the padded batch")

    def input_paths(self) -> dict[str, str]:
        return {**super().input_paths(), "data": self.data}

    def owned_trl_fields(self) -> dict[str, str]:
        return {**super().owned_trl_fields(), "max_length": "max_length",
                "dataset_kwargs": "(fixed: our collator prepares the data)", "packing": "packing",
                "padding_free": "packing"}

    @model_validator(mode="after")
    def _check_data(self):
        if self.streaming and self.max_steps <= 0:
            raise ValueError("max_steps: streaming data has no length, so max_steps must be set (> 0)")
        return self


class CPTPhaseConfig(_SupervisedConfig):
    """Continued pretraining on image-caption pairs; loss on the caption tokens only."""

    instruction: str = "Describe this pathology image."
    mode: Literal["full", "language_model"] = Field(
        "full", description="'language_model' freezes the vision tower and projector")
    learning_rate: float = Field(2e-5, gt=0)

    @model_validator(mode="after")
    def _mode_sets_freezing(self):
        if self.mode == "language_model":
            self.freeze_vision_tower = True
            self.freeze_projector = True
        return self


class SFTPhaseConfig(_SupervisedConfig):
    """Chain-of-thought SFT on conversations; loss on every assistant turn."""

    system_prompt: str | None = REASONING_SYSTEM_PROMPT
