"""The accuracy reward, dispatched on each sample's answer type.

| answer type            | how it is judged                                                                       |
|------------------------|----------------------------------------------------------------------------------------|
| `mcq` (gold A-F)       | `<answer>` content must be exactly the gold letter (strict); `lenient` also takes      |
|                        | `B.`, `(B)`, `B)`, `B. Plasma cells`, `Option B`                                       |
| `yesno`                | normalised yes/no equality                                                             |
| `numeric`              | a number, optionally with a unit: with a unit on either side, the units must be the    |
|                        | same and the values equal; plain numbers and fractions go to math-verify               |
| `expression`           | math-verify (`parse` + `verify`), in worker processes with a hard per-sample timeout   |
| `open`                 | normalised exact string match (use an LLM judge in evaluation for real open VQA)       |

The type comes from an `answer_type` column when the dataset has one, else it is inferred from the gold answer
(`infer_answer_type`): a letter A-F is `mcq`; yes/no is `yesno`; a number (`3.5`, `1/2`, `40%`, `3.5 mm`) is
`numeric`; a formula (digits or letters joined by math operators, or LaTeX) is `expression`; anything else, words
above all, is `open`.  Words never reach math-verify, which reads them as products of symbols: `serous` and `rouses`
would be the same answer there.
The gold answer is read from the `answer` column (or TRL's conventional `solution`).  A missing or malformed answer
scores 0.0; nothing here raises on model output.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from patho_r1.rewards.parsing import OPTION_LETTERS, completion_text, extract_answer
from patho_r1.rewards.pool import VerifierPool

_LENIENT_MCQ = re.compile(r"\A(?:option\s+|answer\s*:?\s*)?[\(\[]?([A-F])[\)\]]?(?:[\s.:,)]|\Z)", re.IGNORECASE)
# A number (sign, decimals, exponent, a simple fraction), then an optional unit that starts with a letter, %, ° or µ.
_NUMBER = r"[-+]?(?:\d+(?:[.,]\d+)?|[.,]\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
_QUANTITY = re.compile(rf"\A\s*(?P<value>{_NUMBER})\s*(?P<unit>(?:[%°µμ]|[A-Za-z])[A-Za-z0-9/^²³µμ%°·.]*)?\s*\Z")
_MATH_FUNCTIONS = re.compile(r"\\[A-Za-z]+|\b(?:sqrt|frac|log|ln|exp|sin|cos|tan|pi)\b")
_OPERATOR = re.compile(r"[+*/^=<>]|(?<=[\w)])\s*-\s*(?=[\w(])|\$")
_YES = {"yes", "y", "true", "correct"}
_NO = {"no", "n", "false", "incorrect"}

MCQ_MODES = ("strict", "lenient")
# The answer types the reward dispatches on (the table above); `math` is an alias of `expression`.
ANSWER_TYPES = ("mcq", "yesno", "numeric", "expression", "math", "open")


def infer_answer_type(gold: str) -> str:
    g = gold.strip()
    if len(g) == 1 and g in OPTION_LETTERS:
        return "mcq"
    if g.lower().rstrip(".") in ("yes", "no"):
        return "yesno"
    if _QUANTITY.match(g):
        return "numeric"
    if _looks_like_formula(g):
        return "expression"
    return "open"


def _looks_like_formula(text: str) -> bool:
    """Math, not words: an operator or LaTeX, and no word of two or more letters once LaTeX commands and function
    names are removed (`x^2+2x+1`, `$\\frac{a}{b}$`; not `T2N0M0`, not `grade 2-3 of 4`)."""
    if re.fullmatch(r"\s*\d+\s*[-–]\s*\d+\s*\S*\s*", text):  # a range such as 5-10%, not a subtraction
        return False
    bare = _MATH_FUNCTIONS.sub(" ", text)
    has_math = _OPERATOR.search(text) is not None or re.search(r"\\[A-Za-z]+", text) is not None
    return has_math and re.search(r"[A-Za-z]{2,}", bare) is None


def _quantity(text: str) -> tuple[str, str] | None:
    """(value, unit) of `3.5 mm`, `40%`, `1/2`; the unit is '' for a bare number; None when it is not a number."""
    m = _QUANTITY.match(text)
    if m is None:
        return None
    unit = (m.group("unit") or "").replace("μ", "µ").rstrip(".")
    return m.group("value").replace(",", "."), unit


def score_quantity(pred: str | None, gold: str) -> float | None:
    """A number with a unit against a gold: 1.0 when the units are the same and the values equal.  None when
    neither side has a unit (plain numbers go to math-verify, which also knows 1/2 = 0.5)."""
    g = _quantity(gold)
    p = _quantity(pred) if pred is not None else None
    if g is None:
        return 0.0
    if p is None:
        return 0.0 if g[1] else None  # `3.5` against `3.5 mm` is wrong; a bare gold may still match an expression
    if not g[1] and not p[1]:
        return None
    if g[1] != p[1]:
        return 0.0  # another unit, or a missing one, is another answer
    try:
        gv, pv = float(eval_fraction(g[0])), float(eval_fraction(p[0]))
    except (ValueError, ZeroDivisionError):
        return 0.0
    return 1.0 if abs(gv - pv) <= 1e-9 * max(1.0, abs(gv)) else 0.0


def eval_fraction(value: str) -> float:
    num, _, den = value.partition("/")
    return float(num) / float(den) if den else float(num)


def score_mcq(pred: str | None, gold: str, mode: str = "strict") -> float:
    if pred is None:
        return 0.0
    gold = gold.strip()
    pred = pred.strip()
    if mode == "strict":
        return 1.0 if len(pred) == 1 and pred in OPTION_LETTERS and pred == gold else 0.0
    m = _LENIENT_MCQ.match(pred)
    # The letter itself must be upper case: a lowercase "a" usually starts a sentence ("a gland ..."), not an option.
    if m is None or not m.group(1).isupper():
        return 0.0
    return 1.0 if m.group(1) == gold else 0.0


def _norm_yesno(text: str) -> str | None:
    """yes / no / None for an answer: its first word when that is yes/no/true/false (`**No**, there is no
    invasion.`), else the one of yes and no that the sentence contains alone, in any case."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in _YES:
        return "yes"
    if words[0] in _NO:
        return "no"
    has_yes, has_no = any(w in ("yes", "true") for w in words), any(w in ("no", "false") for w in words)
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def score_yesno(pred: str | None, gold: str) -> float:
    if pred is None:
        return 0.0
    p, g = _norm_yesno(pred), _norm_yesno(gold)
    return 1.0 if p is not None and p == g else 0.0


def _norm_open(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation).split())


def math_verify_score(pred: str, gold: str) -> float:
    """math-verify equivalence of two answers.  Runs in a worker process's main thread, so math-verify's own
    signal-based timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`) and the pool's hard timeout rules."""
    import logging

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # math-verify warns on every call that its own timeout is off; the pool's per-sample limit replaces it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    def _parse(text: str):
        parsed = parse(text, extraction_config=config, parsing_timeout=None)
        if not parsed and "$" not in text:
            parsed = parse(f"${text}$", extraction_config=config, parsing_timeout=None)
        return parsed

    gold_parsed = _parse(gold)
    if not gold_parsed:
        return 0.0
    pred_parsed = _parse(pred)
    if not pred_parsed:
        return 0.0
    return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=None) else 0.0


class AccuracyReward:
    __name__ = "accuracy"

    def __init__(self, mcq_mode: str = "strict", math_timeout: float = 5.0, math_workers: int = 1,
                 pool: VerifierPool | None = None):
        """`math_timeout`: the hard per-sample limit for math-verify, in seconds; `math_workers`: its worker
        processes (0 runs it inline, with no hard limit)."""
        if mcq_mode not in MCQ_MODES:
            raise ValueError(f"mcq_mode must be 'strict' or 'lenient', got {mcq_mode!r}")
        self.mcq_mode, self.math_timeout, self.math_workers = mcq_mode, math_timeout, math_workers
        self._pool = pool

    @property
    def pool(self) -> VerifierPool:
        if self._pool is None:
            self._pool = VerifierPool(workers=self.math_workers, timeout=self.math_timeout)
        return self._pool

    def __call__(self, prompts=None, completions=None, completion_ids=None, answer=None, solution=None,
                 answer_type=None, **columns) -> list[float]:
        golds = answer if answer is not None else solution
        if golds is None:
            raise ValueError("accuracy needs the gold answer in an `answer` (or `solution`) column")
        types: Sequence[str | None] = answer_type if answer_type is not None else [None] * len(completions)
        scores: list[float] = [0.0] * len(completions)
        math_jobs: list[tuple[int, str, str]] = []
        for i, (completion, gold, kind) in enumerate(zip(completions, golds, types, strict=True)):
            pred = extract_answer(completion_text(completion))
            gold = "" if gold is None else str(gold)
            kind = kind or infer_answer_type(gold)
            if kind == "mcq":
                scores[i] = score_mcq(pred, gold, self.mcq_mode)
            elif kind == "yesno":
                scores[i] = score_yesno(pred, gold)
            elif kind in ("numeric", "expression", "math"):
                by_unit = score_quantity(pred, gold) if kind == "numeric" else None
                if by_unit is not None:
                    scores[i] = by_unit
                elif pred:
                    math_jobs.append((i, pred, gold))
            elif kind == "open":
                scores[i] = 1.0 if pred is not None and _norm_open(pred) == _norm_open(gold) else 0.0
            else:
                raise ValueError(f"unknown answer_type {kind!r}")
        if math_jobs:
            results = self.pool.map(math_verify_score, [(p, g) for _, p, g in math_jobs], default=0.0)
            for (i, _, _), value in zip(math_jobs, results, strict=True):
                scores[i] = float(value)
        return scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


accuracy_reward = AccuracyReward(math_workers=0)
"""Ready-to-use accuracy reward (strict MCQ; math-verify inline).  For training, build one from the registry, which
runs math-verify in a worker pool with a hard timeout."""
