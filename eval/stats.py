"""The statistics every accuracy we report carries: a Wilson interval for one score, McNemar's exact test for two
checkpoints scored on the same items."""

from __future__ import annotations


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy (scipy's binomial test); (0, 1) for no items."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar(a: str, b: str, correct_a: list[bool], correct_b: list[bool]) -> dict:
    """McNemar's exact test for two checkpoints scored on the same items: of the items on which they disagree, does
    one win more than a fair coin would give?  (Two-sided binomial test on the discordant pairs.)"""
    from scipy.stats import binomtest

    gained = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if y and not x)
    lost = sum(1 for x, y in zip(correct_a, correct_b, strict=True) if x and not y)
    p = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
    return {"from": a, "to": b, "gained": gained, "lost": lost, "p_value": float(p)}
