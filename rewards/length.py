"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), on completion lengths in tokens.

    R(y) = 0                                  if |y| <= L_max - L_cache
         = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
         = -1                                 if |y| > L_max
"""

from __future__ import annotations


def soft_overlong_penalty(length: int, max_completion_length: int, cache_length: int) -> float:
    safe_length = max_completion_length - cache_length
    if length <= safe_length:
        return 0.0
    if length <= max_completion_length:
        return (safe_length - length) / cache_length
    return -1.0


class SoftOverlongReward:
    """Lengths come from TRL's `completion_ids`, or from a `completion_length` column when scoring offline."""

    __name__ = "soft_overlong"

    def __init__(self, max_completion_length: int = 2048, cache_length: int = 512):
        if max_completion_length <= 0:
            raise ValueError(f"max_completion_length must be positive, got {max_completion_length}")
        if not 0 < cache_length <= max_completion_length:
            raise ValueError(f"cache_length must be in (0, max_completion_length], got {cache_length}")
        self.max_completion_length = max_completion_length
        self.cache_length = cache_length

    def __call__(self, prompts=None, completions=None, completion_ids=None, completion_length=None, **columns):
        if completion_ids is not None:
            lengths = [len(ids) for ids in completion_ids]
        elif completion_length is not None:
            lengths = [int(n) for n in completion_length]
        else:
            raise ValueError("soft_overlong needs token lengths: `completion_ids` (TRL) or a `completion_length` "
                             "column")
        return [soft_overlong_penalty(n, self.max_completion_length, self.cache_length) for n in lengths]
