"""Other projects' answer-matching rules, reimplemented so our numbers equal theirs, quirks included: VLMEvalKit's
exact matching (MCQ and yes/no), PathMMU's official rule, LLaVA-Med's (PathVQA) and Quilt-LLaVA's (Quilt-VQA) closed
and open rules; beside them our corrected rules, which fix what the quirks over- or under-credit.

Sources (each section names its file and commit):
- `vlmeval/utils/matching_util.py` (`can_infer_option`, `can_infer_text`, `can_infer`) of ms-vlmeval 0.0.20, which
  `ImageMCQDataset.evaluate(..., model='exact_matching')` applies to each prediction.  When `vlmeval` is installed,
  `tests/test_eval.py` checks this copy against it; otherwise against a table of its documented behaviour.
- PathMMU-Benchmark/PathMMU `eval/utils/eval_utils.py`, `eval/utils/data_utils.py`, `eval/main.py`.
- microsoft/LLaVA-Med `llava/eval/run_eval.py` and `llava/eval/eval_metrics/`; aldraus/quilt-llava
  `llava/eval/quilt_eval.py` and `quilt_utils.py`.

What the rules mean for reasoning models: the matchers do not understand `<think>`/`<answer>` tags, and a letter
anywhere in a long trace can be picked up.  That is why every caller passes only the final answer.
"""

from __future__ import annotations

import copy
import random
import re
import string
from collections import Counter
from dataclasses import dataclass

from patho_r1.rewards.accuracy import score_mcq

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


def exact_option(response: str, options: dict[str, str]) -> str | None:
    """The option whose whole text the response is (any case, outer spaces and end punctuation aside), or None: the
    credit both corrected MCQ rules give first."""
    said = response.strip().strip(".,!?;:'\"").strip().lower()
    return next((k for k, v in options.items() if v.strip().lower() == said), None) if said else None


def corrected_exact_mcq(prediction: str, choices: dict[str, str]) -> str | None:
    """Our corrected reading of a VLMEvalKit-set answer: a response that is exactly an option's text (any case, outer
    spaces and end punctuation aside), else a letter answer form ("B", "(B) text", "B.", "Answer: B", "Option B": the
    RL reward's lenient rule), else `can_infer`; the letter, or None.  It credits the forms the matcher misses and
    never reads a letter from the middle of a sentence."""
    exact = exact_option(prediction, choices)
    if exact is not None:
        return exact
    lead = next((k for k in choices if score_mcq(prediction, k, "lenient") == 1.0), None)
    if lead is not None:
        return lead
    read = can_infer(prediction, dict(choices))
    return read if read in choices else None


# ----------------------------------------------------------------------------------------------------------------------
# PathMMU's official rule: `construct_prompt`'s option texts, `run_model`'s exact-text credit, the MMMU-style parser
#
# Read from PathMMU-Benchmark/PathMMU at b34f21eb7089c8c74ece770d883740a378d906f1: `eval/utils/data_utils.py`
# (`construct_prompt`), `eval/main.py` (`run_model`), `eval/utils/eval_utils.py` (`get_multi_choice_prediction`,
# `evaluate`, and the module's one `random.seed(42)`).
# ----------------------------------------------------------------------------------------------------------------------


def pathmmu_option_text(text: str) -> str:
    """The option text PathMMU scores with.  Upstream takes `option.split(')')[1].strip()` of the release's
    `"A) text"`, which cuts the text at its own first `)`: "A) Lymphoma (diffuse) type" becomes "Lymphoma (diffuse".
    Our readers keep the whole text after the letter, so the same cut is the text's part before its first `)`."""
    return text.split(")", 1)[0].strip()


def pathmmu_parse(response: str, options: dict[str, str]) -> str | None:
    """`get_multi_choice_prediction` up to its random guess: the letter it reads, or None.  Looks for `(A)`, then
    ` A `, then (only in a response of more than 5 words) an option's text; of several, the last placed wins."""
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
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    if by_letter:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in candidates]
    else:
        where = [response.lower().rfind(options[c].lower()) for c in candidates]
    return candidates[where.index(max(where))]  # numpy's argmax: the first of equal maxima


def pathmmu_choice(response: str, options: dict[str, str], rng: random.Random) -> tuple[str, bool]:
    """(chosen letter, parsed): the parser, and when it reads nothing a random letter, as upstream: its module seeds
    `random` with 42 once, and every unparsed response of the run, in order, draws `random.choice(letters)`."""
    letter = pathmmu_parse(response, options)
    return (letter, True) if letter is not None else (rng.choice(list(options)), False)


@dataclass(frozen=True)
class PathMMUVerdict:
    correct: bool
    letter: str | None  # the option the rule settled on; None when our corrected rule read none
    parsed: bool  # False: upstream guessed (official) or nothing was read (corrected)


def pathmmu_official(response: str, options: dict[str, str], gold: str, rng: random.Random) -> PathMMUVerdict:
    """PathMMU's verdict, quirks included: option texts cut at their first `)` (options that differ only after it
    become one: picking either is right); the parser runs first (so an unparsed response draws from the random
    stream even when the next rule credits it); then a response *equal* to the gold option's cut text, case and
    spaces included, is credited (`run_model`); the chosen text is compared with the gold's, case-insensitively."""
    texts = {k: pathmmu_option_text(v) for k, v in options.items()}
    letter, parsed = pathmmu_choice(response, texts, rng)
    if response == texts[gold]:
        letter, parsed = gold, True
    return PathMMUVerdict(texts[letter].lower() == texts[gold].lower(), letter, parsed)


def corrected_mcq(response: str, options: dict[str, str], gold: str) -> PathMMUVerdict:
    """Our corrected MCQ rule, for every benchmark, on PathMMU's parser: whole option texts; a response that is
    exactly one option's text (any case, outer spaces and end punctuation aside) picks it; nothing read is wrong,
    never a coin toss."""
    letter = exact_option(response, options)
    if letter is None:
        letter = pathmmu_parse(response, options)
    return PathMMUVerdict(letter == gold, letter, letter is not None)


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA-Med's and Quilt-LLaVA's VQA rules (PathVQA and Quilt-VQA: closed yes/no and open token metrics)
#
# Read from microsoft/LLaVA-Med at b9a98a736d2ef05bcf5ff345be6403fb3a664eaf (the last commit with the v1 eval code,
# before v1.5 removed it): `llava/eval/run_eval.py` (`evaluate`), `llava/eval/eval_metrics/glossary.py`
# (`normalize_word`), `.../evaluate_metrics.py` (`calculate_exactmatch`, `calculate_f1score`), `.../utils.py`
# (`split_sentence`); and from aldraus/quilt-llava at a7a9a4c3ddccea6011e5ba34e8666514b855b93a:
# `llava/eval/quilt_eval.py` (`evaluate`, run with `--quilt True` by `scripts/v1_5/eval/quilt_vqa.sh`) and
# `llava/eval/quilt_utils.py`, whose `normalize_word`, punctuation list and contraction table are the same as
# LLaVA-Med's, and whose token metrics are the same functions.
# ----------------------------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                 "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA-eval contraction table both projects carry (120 pairs, `key value` in upstream order).  Keys with capitals
# never match, since the words are lower-cased first; `somebody'd` -> `somebodyd` is upstream's, sic.
_CONTRACTION_PAIRS = """
aint ain't arent aren't cant can't couldve could've couldnt couldn't couldn'tve couldn't've couldnt've couldn't've
didnt didn't doesnt doesn't dont don't hadnt hadn't hadnt've hadn't've hadn'tve hadn't've hasnt hasn't havent haven't
hed he'd hed've he'd've he'dve he'd've hes he's howd how'd howll how'll hows how's Id've I'd've I'dve I'd've Im I'm
Ive I've isnt isn't itd it'd itd've it'd've it'dve it'd've itll it'll let's let's maam ma'am mightnt mightn't
mightnt've mightn't've mightn'tve mightn't've mightve might've mustnt mustn't mustve must've neednt needn't notve not've
oclock o'clock oughtnt oughtn't ow's'at 'ow's'at 'ows'at 'ow's'at 'ow'sat 'ow's'at shant shan't shed've she'd've
she'dve she'd've she's she's shouldve should've shouldnt shouldn't shouldnt've shouldn't've shouldn'tve shouldn't've
somebody'd somebodyd somebodyd've somebody'd've somebody'dve somebody'd've somebodyll somebody'll somebodys somebody's
someoned someone'd someoned've someone'd've someone'dve someone'd've someonell someone'll someones someone's
somethingd something'd somethingd've something'd've something'dve something'd've somethingll something'll
thats that's thered there'd thered've there'd've there'dve there'd've therere there're theres there's theyd they'd
theyd've they'd've they'dve they'd've theyll they'll theyre they're theyve they've twas 'twas wasnt wasn't
wed've we'd've we'dve we'd've weve we've werent weren't whatll what'll whatre what're whats what's whatve what've
whens when's whered where'd wheres where's whereve where've whod who'd whod've who'd've who'dve who'd've wholl who'll
whos who's whove who've whyll why'll whyre why're whys why's wont won't wouldve would've wouldnt wouldn't
wouldnt've wouldn't've wouldn'tve wouldn't've yall y'all yall'll y'all'll y'allll y'all'll yall'd've y'all'd've
y'alld've y'all'd've y'all'dve y'all'd've youd you'd youd've you'd've you'dve you'd've youll you'll youre you're
youve you've""".split()
_CONTRACTIONS = dict(zip(_CONTRACTION_PAIRS[::2], _CONTRACTION_PAIRS[1::2], strict=True))
# sic: upstream writes `(?!<=\d)`, a look-ahead for the text "<=digit", where a look-behind was meant; so a period
# before a digit is kept and every other one removed, including one after a digit ("3." -> "3")
_LLAVA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_UPSTREAM_PERIOD_CAP = re.UNICODE  # sic: upstream passes re.UNICODE (32) as `sub`'s count: 32 periods a call at most


def vqa_normalize(text: str, period_cap: int = _UPSTREAM_PERIOD_CAP) -> str:
    """`normalize_word`, the VQA-eval normaliser both projects use: punctuation, periods (at most `period_cap` of
    them, upstream's accidental 32; 0 removes all), lower case, number words to digits, articles dropped, the
    contraction table, commas."""
    text = _LLAVA_PERIOD.sub("", _strip_punctuation(text), period_cap)
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def token_scores(prediction: str, reference: str) -> dict[str, float]:
    """`calculate_f1score` and `calculate_exactmatch` on words of already normalised texts (each normalises its
    inputs once more itself, as upstream's do): f1, precision, recall (the open-set number LLaVA-Med and Quilt-LLaVA
    report) and `exact_match`.  Upstream quirks, kept: a shared word's true positives are counted with the
    *prediction's* count; zeros when either side is empty or nothing is shared; and "exact match" is the number of
    distinct reference words found among the prediction's words over the prediction's word count, not equality."""
    cand = Counter(vqa_normalize(prediction).split())
    ref = Counter(vqa_normalize(reference).split())
    total = sum(cand.values())
    exact = sum(1 for w in ref if w in cand) / total if total else 0.0
    tp = sum(n for w, n in cand.items() if w in ref)
    if not cand or not ref or tp == 0:
        return {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact_match": exact}
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"f1": 2 * precision * recall / (precision + recall), "precision": precision, "recall": recall,
            "exact_match": exact}


def llava_med_open_scores(prediction: str, reference: str) -> dict[str, float]:
    """LLaVA-Med's (and Quilt-LLaVA's) open-question metrics as `evaluate` computes them: it lower-cases and
    normalises both texts, then the metric functions normalise them again; twice, so the 32-period cap applies
    twice."""
    return token_scores(vqa_normalize(prediction.lower()), vqa_normalize(reference.lower()))


def llava_med_closed_correct(prediction: str, gold: str) -> bool:
    """LLaVA-Med's closed (yes/no) verdict after commit 8faf5ec ("fix closed accuracy calculation": a miss now counts
    in the denominator): on the normalised texts, `'yes' in pred or 'no' in pred`, then `gold in pred`, both
    *substring* tests.  So "The eyes are visible" holds "yes"; "Not seen" and "unknown" hold "no"; an answer naming
    both words is right whatever the gold."""
    pred, gold = vqa_normalize(prediction.lower()), vqa_normalize(gold.lower())
    return ("yes" in pred or "no" in pred) and gold in pred


def quilt_closed_answer(prediction: str) -> str:
    """Quilt-LLaVA's reading of a closed answer (`quilt_eval.py --quilt True`): the normalised prediction, commas
    dropped, split on single spaces, means "no" when it holds the word `no` or `not` (`No` is checked too, but the
    text is lower case by then), and "yes" otherwise: a refusal, an empty answer or "unclear" all read as yes."""
    words = vqa_normalize(prediction.lower()).replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def quilt_closed_correct(prediction: str, gold: str) -> bool:
    """Quilt-LLaVA's closed verdict: its reading equals the row's `yes_no_answer`, lower-cased (not normalised)."""
    return quilt_closed_answer(prediction) == gold.lower()


# ----------------------------------------------------------------------------------------------------------------------
# Our corrected open-answer rule: one normalisation, every period, exact match as equality
# ----------------------------------------------------------------------------------------------------------------------


def corrected_open_scores(prediction: str, reference: str) -> dict[str, float]:
    """The same token f1 / precision / recall, computed on texts normalised once with no period cap, and exact match
    as equality of the normalised texts."""
    pred, ref = vqa_normalize(prediction, period_cap=0), vqa_normalize(reference, period_cap=0)
    cand, gold = Counter(pred.split()), Counter(ref.split())
    tp = sum(min(n, gold[w]) for w, n in cand.items())
    scores = {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact_match": float(bool(ref) and pred == ref)}
    if tp:
        precision, recall = tp / sum(cand.values()), tp / sum(gold.values())
        scores.update(f1=2 * precision * recall / (precision + recall), precision=precision, recall=recall)
    return scores
