"""Phase 1: continued pretraining (knowledge infusion) on pathology image-caption pairs.

Each pair becomes `user: <image> + instruction` -> `assistant: caption`, and the loss is on the caption tokens only
(TRL's prompt-completion path).  `mode: language_model` freezes the vision tower and projector.
"""

from __future__ import annotations

from patho_r1.config import PhaseResult
from patho_r1.sft.config import CPTPhaseConfig
from patho_r1.sft.data import caption_rows, to_dataset
from patho_r1.sft.trainer import run_supervised


def run_cpt(cfg: CPTPhaseConfig, callbacks=()) -> PhaseResult:
    cfg.check_inputs()
    dataset = to_dataset(caption_rows, streaming=cfg.streaming, source=cfg.data, instruction=cfg.instruction)
    return run_supervised(cfg, "cpt", dataset, system_prompt=None, callbacks=callbacks)
