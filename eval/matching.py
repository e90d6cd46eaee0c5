"""Other projects' answer-matching rules, reproduced so our scores agree with theirs: VLMEvalKit's exact matching
(MCQ and yes/no), PathMMU's official choice parser, and LLaVA-Med's token metrics for open answers.

Sources:
- `vlmeval/utils/matching_util.py` (`can_infer_option`, `can_infer_text`, `can_infer`) of ms-vlmeval 0.0.20, which
  `ImageMCQDataset.evaluate(..., model='exact_matching')` applies to each prediction.  When `vlmeval` is installed,
  `tests/test_eval.py` checks this copy against it; otherwise against a table of its documented behaviour.
- `PathMMU-Benchmark/PathMMU:eval/utils/eval_utils.py` (`get_multi_choice_prediction`, `evaluate`).
- `microsoft/LLaVA-Med:llava/eval/eval_metrics/` (`normalize_word`, `split_sentence`, `calculate_f1score`).

What the rules mean for reasoning models: the matchers do not understand `<think>`/`<answer>` tags, and a letter
anywhere in a long trace can be picked up.  That is why every caller passes only the final answer.
"""

from __future__ import annotations

import copy
import random
import re
import string
from collections import Counter

_REJECTIONS = (
    "Sorry, I can't help with images of people yet.", "I can't process this file.",
    "I'm sorry, but without the image provided", "Cannot determine the answer",
)


def can_infer_option(answer: str, choices: dict[str, str]) -> str | bool:
    if "Failed to obtain answer via API" in answer:
        return False
    for err in _REJECTIONS:
        if err in answer:
            return "Z"

    def count_choice(splits, options, prefix="", suffix=""):
        return sum(1 for c in options if prefix + c + suffix in splits)

    answer_mod = copy.copy(answer)
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > (len(splits) - 5):
                return ch
    elif count == 0 and count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    return False


def can_infer_text(answer: str, choices: dict[str, str]) -> str | bool:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    lowered = {k: str(v).lower() for k, v in choices.items()}
    cands = [k for k in lowered if lowered[k] in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer, choices: dict[str, str]) -> str | bool:
    answer = str(answer)
    option = can_infer_option(answer, choices)
    return option if option else can_infer_text(answer, choices)


def exact_match_mcq(prediction: str, choices: dict[str, str], gold: str) -> bool:
    """VLMEvalKit's exact-matching verdict for one MCQ prediction."""
    assert all(k in string.ascii_uppercase for k in choices)
    return can_infer(prediction, dict(choices)) == gold


# ----------------------------------------------------------------------------------------------------------------------
# Yes/no: VLMEvalKit's verdict, quirks included (ImageYORNDataset with exact matching)
# ----------------------------------------------------------------------------------------------------------------------


_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _strip_punctuation(text: str) -> str:
    """The VQA-eval punctuation pass both VLMEvalKit and LLaVA-Med copy: a mark beside a space (or any mark, once
    the text has a digit-comma-digit) is deleted, otherwise it becomes a space."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or (re.search(_COMMA_STRIP, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return out


def vlmeval_process_punctuation(text: str) -> str:
    """`vlmeval.smp.misc.process_punctuation` (ms-vlmeval 0.0.20)."""
    period_strip = re.compile(r"(?<!\d)\.(?!\d)")
    return period_strip.sub("", _strip_punctuation(text), re.UNICODE)  # sic: re.UNICODE lands in `count`, as upstream


def vlmeval_yesno_extract(output: str) -> str:
    """`YOrN_Extraction`: 'Yes' when the word yes appears and no does not, 'No' the other way, else 'Unknown'."""
    words = vlmeval_process_punctuation(str(output).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "yes" not in words and "no" in words:
        return "No"
    return "Unknown"


def vlmeval_yesno_correct(prediction: str, gold: str) -> bool:
    """VLMEvalKit's yes/no verdict: the extraction must equal the gold string exactly.  Quirk, kept on purpose in
    this mode: the comparison is case-sensitive, so a lower-case gold (`yes`, as PathVQA writes it) never matches,
    and a sentence that mentions both words ("yes, no invasion") is Unknown."""
    return vlmeval_yesno_extract(prediction) == str(gold)


# ----------------------------------------------------------------------------------------------------------------------
# PathMMU's official choice parser (MMMU-style), and its accuracy rule
# ----------------------------------------------------------------------------------------------------------------------


def pathmmu_choice(response: str, options: dict[str, str], rng: random.Random) -> tuple[str, bool]:
    """(chosen letter, parsed): `get_multi_choice_prediction`.  Looks for `(A)`, then ` A `, then (only in a response
    of more than 5 words) an option's text; the last-placed candidate wins.  Quirk, kept: when nothing is found it
    picks a random letter (upstream seeds `random` with 42 once per run), so `parsed` says when that happened."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_letter = bool(candidates), True
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in response.lower()]
        by_letter = False
    if not candidates:
        return rng.choice(letters), False
    if len(candidates) == 1:
        return candidates[0], True
    if by_letter:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        where = [response.lower().rfind(options[c].lower()) for c in candidates]
    return candidates[where.index(max(where))], True


def pathmmu_correct(response: str, options: dict[str, str], gold: str, rng: random.Random) -> tuple[bool, bool]:
    """(correct, parsed): upstream compares the chosen option's *text* with the gold's, case-insensitively, so two
    options with the same text count as one."""
    letter, parsed = pathmmu_choice(response, options, rng)
    return options[letter].lower() == options[gold].lower(), parsed


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Med's open-answer token metrics (the PathVQA / Quilt-VQA "open" numbers papers report)
# ----------------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# sic: upstream writes `(?!<=\d)`, a look-ahead for the text "<=digit", where a look-behind was meant; so a period
# before a digit is kept and every other one removed, including one after a digit ("3." -> "3")
_LLAVA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def llava_med_normalize(text: str) -> str:
    """`normalize_word`: punctuation, lower case, number words to digits, articles dropped (the contraction table,
    which only adds apostrophes, is left out: it changes no token that the metrics then compare)."""
    text = _LLAVA_PERIOD.sub("", _strip_punctuation(text), re.UNICODE)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES).replace(",", "")


def llava_med_token_scores(prediction: str, reference: str) -> dict[str, float]:
    """`calculate_f1score` on normalised unigrams: f1, precision and recall (recall is the open-set number LLaVA-Med
    reports).  Upstream counts a shared word's true positives with the *prediction's* count, and returns zeros when
    either side is empty or nothing is shared; so does this."""
    cand = Counter(llava_med_normalize(prediction).split())
    ref = Counter(llava_med_normalize(reference).split())
    if not cand or not ref:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"f1": 2 * precision * recall / (precision + recall), "precision": precision, "recall": recall}
