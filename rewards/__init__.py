"""Reward functions for Patho-R1 RL, with TRL's reward signature.

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]

Completions may be strings or `[{"role": "assistant", "content": str}]`.  Every function here plugs straight into
`trl.GRPOTrainer(reward_funcs=[...])` and works on plain lists for offline scoring:

    >>> from patho_r1.rewards import format_reward, accuracy_reward
    >>> format_reward(prompts=None, completions=["<think>dense nuclei</think><answer>B</answer>"])
    [1.0]
    >>> accuracy_reward(prompts=None, completions=["<think>...</think><answer>B</answer>"], answer=["B"])
    [1.0]

Swap or add rewards by name in a recipe (see `rewards.registry`), or register your own:

    >>> from patho_r1.rewards import register_reward
    >>> @register_reward("brevity")
    ... def make_brevity(max_chars=400):
    ...     def brevity(prompts, completions, **kw):
    ...         return [1.0 if len(str(c)) <= max_chars else 0.0 for c in completions]
    ...     return brevity
"""

from patho_r1.rewards.accuracy import AccuracyReward, accuracy_reward, infer_answer_type, math_verify_score, score_mcq
from patho_r1.rewards.format import FormatReward, format_reward
from patho_r1.rewards.length import SoftOverlongReward, soft_overlong_penalty
from patho_r1.rewards.parsing import (
    OPTION_LETTERS,
    REASONING_SYSTEM_PROMPT,
    completion_text,
    extract_answer,
    extract_final_answer,
    is_strict_format,
    split_thinking,
)
from patho_r1.rewards.pool import VerifierPool
from patho_r1.rewards.registry import (
    PRESETS,
    REGISTRY,
    RewardFailure,
    RewardRegistry,
    RewardSet,
    RewardSpec,
    SafeReward,
    build_rewards,
    expand_preset,
    register_reward,
    reward_labels,
    weighted_total,
)

soft_overlong_reward = SoftOverlongReward()
"""DAPO soft overlong punishment with the Patho-R1 defaults (L_max 2048, L_cache 512)."""

__all__ = [
    "AccuracyReward", "FormatReward", "SoftOverlongReward", "VerifierPool", "RewardRegistry", "RewardSet",
    "RewardSpec", "SafeReward", "RewardFailure", "reward_labels", "weighted_total", "OPTION_LETTERS",
    "REASONING_SYSTEM_PROMPT", "PRESETS", "REGISTRY", "accuracy_reward", "format_reward", "soft_overlong_reward",
    "soft_overlong_penalty", "build_rewards", "expand_preset", "register_reward", "completion_text",
    "extract_answer", "extract_final_answer", "is_strict_format", "split_thinking", "infer_answer_type",
    "math_verify_score", "score_mcq",
]
