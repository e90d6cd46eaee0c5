"""The format reward: 1.0 for the strict `<think>...</think><answer>...</answer>` layout, else 0.0."""

from __future__ import annotations

from patho_r1.rewards.parsing import completion_text, is_strict_format


class FormatReward:
    """Patho-R1 section 3.4: `<think>` and `<answer>` blocks each appear exactly once, think first, nothing but
    whitespace outside them.  An empty answer block is still well formed; accuracy scores its content."""

    __name__ = "format"

    def __call__(self, prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
        return [1.0 if is_strict_format(completion_text(c)) else 0.0 for c in completions]


format_reward = FormatReward()
