"""Phase 2: chain-of-thought SFT on `<think>...</think><answer>...</answer>` conversations.

MCQ, description, complex reasoning and multi-turn samples; loss on every assistant turn; the Patho-R1 reasoning
system prompt by default; optional LoRA on the language model.
"""

from __future__ import annotations

from patho_r1.config import PhaseResult
from patho_r1.sft.config import SFTPhaseConfig
from patho_r1.sft.data import conversation_rows, to_dataset
from patho_r1.sft.trainer import run_supervised


def run_sft(cfg: SFTPhaseConfig, callbacks=()) -> PhaseResult:
    cfg.check_inputs()
    dataset = to_dataset(conversation_rows, streaming=cfg.streaming, source=cfg.data)
    return run_supervised(cfg, "sft", dataset, system_prompt=cfg.system_prompt, callbacks=callbacks)
