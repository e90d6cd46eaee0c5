"""The rules a benchmark's answers are scored by: its **official** rule (the benchmark's own evaluation code, quirks
included, so our number equals the one its paper's table was computed with) and our **corrected** rule (the same
intent without the quirks), for each kind of question: MCQ, closed yes/no and open.

| rules       | benchmarks                                 | MCQ                 | closed (yes/no)     | open      |
|-------------|--------------------------------------------|---------------------|---------------------|-----------|
| `pathmmu`   | PathMMU                                    | PathMMU's parser    | -                   | -         |
| `vlmeval`   | MedXpertQA-MM, OmniMedVQA, our own sets    | VLMEvalKit can_infer| VLMEvalKit YOrN     | LLaVA-Med |
| `llava-med` | PathVQA                                    | -                   | LLaVA-Med substring | LLaVA-Med |
| `quilt`     | Quilt-VQA                                  | -                   | Quilt-LLaVA no/not  | LLaVA-Med |

Corrected: MCQ on PathMMU by its parser on whole option texts, an exact option text picking its option, nothing read
wrong (never a random letter); MCQ on VLMEvalKit sets by an exact option text, else a letter answer form ("B",
"(B) text", "Answer: B"), else `can_infer` (`corrected_exact_mcq`); yes/no by meaning (`score_yesno`: the first
word, or the one of yes/no a sentence holds alone, true/false, any case); open by token metrics on texts normalised
once, exact match as equality.  The upstream rules themselves, each with its file and commit, are in
`patho_r1.eval.matching`; their quirks are listed in `docs/benchmarks.md`.

Every rule scores the final answer (`extract_final_answer`), as our VLMEvalKit hook hands it to VLMEvalKit: the
official codes know no `<think>`/`<answer>` tags.  Open answers have no right/wrong rule in the official codes
(`correct` is None; the LLM judge, when one is given, decides them).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from patho_r1.data import MCQRecord
from patho_r1.eval.matching import (
    can_infer,
    corrected_exact_mcq,
    corrected_mcq,
    corrected_open_scores,
    llava_med_closed_correct,
    llava_med_open_scores,
    pathmmu_official,
    quilt_closed_answer,
    vlmeval_yesno_correct,
    vlmeval_yesno_extract,
)
from patho_r1.rewards.accuracy import score_yesno

SCORERS = ("official", "corrected")


@dataclass(frozen=True)
class RuleVerdict:
    correct: bool | None  # None: an open answer, which no rule calls right or wrong
    choice: str | None = None  # what the rule read: an option letter or yes/no; None when it read nothing
    guessed: bool = False  # the official PathMMU verdict rests on a random letter (nothing parsed, no credit)
    metrics: dict[str, float] = field(default_factory=dict)  # open answers: f1, precision, recall, exact_match


@dataclass(frozen=True)
class Rules:
    """One benchmark family's official rules, and our corrected ones (shared but for the MCQ reading)."""

    name: str
    source: str  # where the official rule was read, for the results' header
    mcq: str | None = None  # "pathmmu" or "vlmeval"
    closed: str | None = None  # "vlmeval", "llava-med" or "quilt"

    def official(self, record: MCQRecord, prediction: str, rng: random.Random) -> RuleVerdict:
        kind = record.answer_type
        if kind == "mcq" and self.mcq == "pathmmu":
            v = pathmmu_official(prediction, record.options, record.answer, rng)
            return RuleVerdict(v.correct, v.letter, guessed=not v.parsed)
        if kind == "mcq":
            read = can_infer(prediction, dict(record.options))
            return RuleVerdict(read == record.answer, read if read in record.options else None)
        if kind == "yesno" and self.closed == "llava-med":
            return RuleVerdict(llava_med_closed_correct(prediction, record.answer), _yes_or_no(prediction))
        if kind == "yesno" and self.closed == "quilt":
            read = quilt_closed_answer(prediction)
            return RuleVerdict(read == record.answer.lower(), read)
        if kind == "yesno":
            read = vlmeval_yesno_extract(prediction)
            return RuleVerdict(vlmeval_yesno_correct(prediction, record.answer),
                           read.lower() if read in ("Yes", "No") else None)
        return RuleVerdict(None, metrics=llava_med_open_scores(prediction, record.answer))

    def corrected(self, record: MCQRecord, prediction: str) -> RuleVerdict:
        kind = record.answer_type
        if kind == "mcq" and self.mcq == "pathmmu":
            v = corrected_mcq(prediction, record.options, record.answer)
            return RuleVerdict(v.correct, v.letter)
        if kind == "mcq":
            read = corrected_exact_mcq(prediction, record.options)
            return RuleVerdict(read == record.answer, read)
        if kind == "yesno":
            return RuleVerdict(score_yesno(prediction, record.answer) == 1.0, _yes_or_no(prediction))
        return RuleVerdict(None, metrics=corrected_open_scores(prediction, record.answer))


def _yes_or_no(prediction: str) -> str | None:
    """What a yes/no answer says, by meaning (for the confusion table; the verdicts have their own rules)."""
    return "yes" if score_yesno(prediction, "yes") else "no" if score_yesno(prediction, "no") else None


RULES: dict[str, Rules] = {r.name: r for r in (
    Rules("pathmmu", "PathMMU-Benchmark/PathMMU eval/utils/eval_utils.py + eval/main.py run_model @ b34f21e",
          mcq="pathmmu"),
    Rules("vlmeval", "VLMEvalKit 0.0.20 exact matching (can_infer; YOrN_Extraction)", mcq="vlmeval",
          closed="vlmeval"),
    Rules("llava-med", "microsoft/LLaVA-Med llava/eval/run_eval.py + eval_metrics/ @ b9a98a7", closed="llava-med"),
    Rules("quilt", "aldraus/quilt-llava llava/eval/quilt_eval.py --quilt True + quilt_utils.py @ a7a9a4c",
          closed="quilt"),
)}
