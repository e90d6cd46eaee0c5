"""VLMEvalKit's exact-matching rules for MCQ and yes/no answers, reproduced so our scorer agrees with it.

Source: `vlmeval/utils/matching_util.py` (`can_infer_option`, `can_infer_text`, `can_infer`) of ms-vlmeval 0.0.20,
which `ImageMCQDataset.evaluate(..., model='exact_matching')` applies to each prediction.  When `vlmeval` is
installed, `tests/test_eval.py` checks this copy against it; otherwise against a table of its documented behaviour.

What the rules mean for reasoning models: the matcher does not understand `<think>`/`<answer>` tags, and a letter
anywhere in a long trace can be picked up.  That is why the VLMEvalKit hook returns only the `<answer>` content.
"""

from __future__ import annotations

import copy
import re
import string

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


def vlmeval_process_punctuation(text: str) -> str:
    """`vlmeval.smp.misc.process_punctuation` (ms-vlmeval 0.0.20), line for line."""
    out = text
    comma_strip = re.compile(r"(\d)(,)(\d)")
    period_strip = re.compile(r"(?<!\d)\.(?!\d)")
    for p in [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"]:
        if (p + " " in text or " " + p in text) or (re.search(comma_strip, text) is not None):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period_strip.sub("", out, re.UNICODE)  # sic: re.UNICODE lands in `count`, as upstream


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
