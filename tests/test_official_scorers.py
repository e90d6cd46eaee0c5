"""The official scorers, case by case against the upstream rules, each expected value worked by hand from the upstream
source (PathMMU @ b34f21e, LLaVA-Med @ b9a98a7, Quilt-LLaVA @ a7a9a4c; see `patho_r1.eval.matching`), and the
corrected rules beside them."""

from __future__ import annotations

import random

import pytest

from patho_r1.data import MCQRecord
from patho_r1.eval.benchmarks import get_benchmark
from patho_r1.eval.matching import (
    corrected_mcq,
    corrected_open_scores,
    llava_med_closed_correct,
    llava_med_open_scores,
    pathmmu_official,
    pathmmu_option_text,
    quilt_closed_correct,
    token_scores,
    vqa_normalize,
)
from patho_r1.eval.scoring import score_responses

LETTERS = list("ABCD")
OPTIONS = {"A": "Adenocarcinoma", "B": "Lymphoma", "C": "Melanoma", "D": "Carcinoid"}
# two options that differ only after a ')': upstream's cut makes them one text
CUT = {"A": "Lymphoma (diffuse) large B cell", "B": "Melanoma", "C": "Adenocarcinoma", "D": "Lymphoma (diffuse) small"}


def _draws(k: int) -> list[str]:
    """Upstream's first k random guesses: `random.seed(42)` once, then `random.choice(all_choices)` per guess."""
    rng = random.Random(42)
    return [rng.choice(LETTERS) for _ in range(k)]


# ----------------------------------------------------------------------------------------------------------------------
# PathMMU: run_model's exact-text credit, the cut at ')', one seeded random stream
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, official, corrected", [
    ("Lymphoma", True, True),  # equal to the gold text: credited by run_model, after the parser guessed
    ("lymphoma", _draws(1)[0] == "B", True),  # the credit is case-sensitive: upstream guesses; ours reads the text
    ("Lymphoma.", _draws(1)[0] == "B", True),  # and exact: "Lymphoma." is not "Lymphoma"
    ("Carcinoid", False, False),  # another option's text: no credit, a guess upstream (never B: it is unequal text)
])
def test_pathmmu_credits_a_response_equal_to_the_gold_text(response, official, corrected):
    got = pathmmu_official(response, OPTIONS, "B", random.Random(42))
    if response == "Carcinoid":  # upstream's guess may land on B; that is its verdict, so compute it the same way
        official = _draws(1)[0] == "B"
    assert got.correct is official
    assert corrected_mcq(response, OPTIONS, "B").correct is corrected


def test_pathmmu_cuts_option_texts_at_their_first_parenthesis():
    assert pathmmu_option_text("Lymphoma (diffuse) large B cell") == "Lymphoma (diffuse"
    assert pathmmu_option_text("Melanoma") == "Melanoma"
    rng = random.Random(42)
    # (D) cuts to the same text as the gold (A): upstream counts it right; ours does not
    assert pathmmu_official("(D)", CUT, "A", rng).correct and not corrected_mcq("(D)", CUT, "A").correct
    # the gold's whole text holds " B ": upstream's parser reads the letter B (Melanoma) before any text; ours takes
    # a response that is exactly an option's text as that option
    assert not pathmmu_official(CUT["A"], CUT, "A", rng).correct and corrected_mcq(CUT["A"], CUT, "A").correct
    # the cut text itself is the gold text upstream compares with: credited
    assert pathmmu_official("Lymphoma (diffuse", CUT, "A", rng).correct
    # option-text candidates (a response of more than 5 words) are found by the cut texts too
    long = "it is most consistent with lymphoma (diffuse here"
    assert pathmmu_official(long, CUT, "D", rng).letter == "A"  # both cut texts match; the first of equal places


def test_pathmmu_guesses_from_one_stream_seeded_once_in_row_order():
    bench = get_benchmark("pathmmu")
    records = [MCQRecord(id=str(i), question="q", options=OPTIONS, answer="B") for i in range(5)]
    # unparsed, parsed (no draw), credited (the parser still drew first), unparsed, unparsed
    responses = ["no idea", "(B)", "Lymphoma", "hmm", "unclear"]
    _, rows = score_responses(bench, records, responses)
    draws = _draws(4)
    guessed = [r.scores["official"]["choice"] for r in rows]
    assert guessed == [draws[0], "B", "B", draws[2], draws[3]]
    assert [bool(r.scores["official"].get("guessed")) for r in rows] == [True, False, False, True, True]
    assert [r.correct for r in rows] == [draws[0] == "B", True, True, draws[2] == "B", draws[3] == "B"]
    assert [r.scores["corrected"]["correct"] for r in rows] == [False, True, True, False, False]  # no coin toss
    assert bench.score(records[1], "<think>x</think><answer>(B)</answer>", random.Random(0)).correct  # one row


# ----------------------------------------------------------------------------------------------------------------------
# VLMEvalKit sets: can_infer, and our corrected reading beside it
# ----------------------------------------------------------------------------------------------------------------------

TISSUES = {"A": "adenocarcinoma", "B": "lymphocytic infiltrate", "C": "mucinous pools", "D": "adipose tissue"}


@pytest.mark.parametrize("prediction, official, corrected", [
    ("B is likely, since " + "the glands are crowded " * 10, False, True),  # the letter leads, too early for can_infer
    ("Lymphocytic infiltrate.", True, True),
    ("Option B", True, True),
    ("It could be A or B", False, False),  # two letters: neither rule picks one
    ("Cannot determine the answer", False, False),  # can_infer's rejection "Z"
    ("a lymphocytic infiltrate around adenocarcinoma glands", False, False),  # two option texts
])
def test_vlmeval_sets_official_can_infer_and_corrected_reading(prediction, official, corrected):
    record = MCQRecord(question="q", options=TISSUES, answer="B")
    rules = get_benchmark("medxpertqa-mm").rules
    assert rules.official(record, prediction, random.Random(0)).correct is official
    assert rules.corrected(record, prediction).correct is corrected


# ----------------------------------------------------------------------------------------------------------------------
# PathVQA closed: LLaVA-Med's substring rule
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold, official, corrected", [
    ("The eyes are visible", "yes", True, False),  # "eyes" holds "yes"
    ("Nothing is seen", "no", True, False),  # "nothing" holds "no"
    ("unknown", "no", True, False),
    ("Yes, but no invasion.", "no", True, False),  # both words: right whatever the gold; ours reads the first
    ("Yes, but no invasion.", "yes", True, True),
    ("True", "yes", False, True),  # no yes/no substring: wrong; ours reads true as yes
    ("Y", "yes", False, True),
    ("No.", "no", True, True),
    ("no", "yes", False, False),
])
def test_pathvqa_closed_is_llava_meds_substring_rule(prediction, gold, official, corrected):
    record = MCQRecord(question="q", answer=gold, answer_type="yesno")
    rules = get_benchmark("pathvqa").rules
    assert llava_med_closed_correct(prediction, gold) is official
    assert rules.official(record, prediction, random.Random(0)).correct is official
    assert rules.corrected(record, prediction).correct is corrected


# ----------------------------------------------------------------------------------------------------------------------
# Quilt-VQA closed: "no" or "not" among the words means no, anything else yes
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, gold, official", [
    ("I cannot determine this from the image", "yes", True),  # a refusal reads as yes
    ("", "yes", True),
    ("Not present", "no", True),
    ("No.", "no", True),
    ("Nothing is seen", "no", False),  # "nothing" is not the word "no" (LLaVA-Med's substring rule says right)
    ("There is no necrosis", "yes", False),
    ("Yes, it is not malignant", "yes", False),  # "not" makes it no
])
def test_quilt_closed_is_quilt_llavas_no_not_rule(prediction, gold, official):
    record = MCQRecord(question="q", answer=gold, answer_type="yesno")
    assert quilt_closed_correct(prediction, gold) is official
    assert get_benchmark("quilt-vqa").rules.official(record, prediction, random.Random(0)).correct is official


# ----------------------------------------------------------------------------------------------------------------------
# Open answers: normalised twice, the contraction table, "exact match" as matched words over prediction words
# ----------------------------------------------------------------------------------------------------------------------

def test_open_answers_are_normalised_twice_so_the_period_cap_applies_twice():
    prediction, reference = "x. " * 33 + "necrosis.", "necrosis"
    # one pass removes 32 periods (re.UNICODE as sub's count): "x." and "necrosis." keep theirs
    assert vqa_normalize(prediction).split()[-2:] == ["x.", "necrosis."]
    assert token_scores(prediction, reference)["recall"] == 0.0  # what a single normalisation gives
    # the official path normalises in evaluate() and again in calculate_f1score: the second pass removes the rest
    official = llava_med_open_scores(prediction, reference)
    assert official["recall"] == 1.0 and official["precision"] == pytest.approx(1 / 34)
    assert corrected_open_scores(prediction, reference)["recall"] == 1.0  # ours removes every period at once


@pytest.mark.parametrize("prediction, reference, recall", [
    ("dont know", "don't know", 1.0),  # "dont" -> "don't"
    ("it isnt malignant", "isn't malignant", 1.0),  # and "it" stays a word
    ("thats a granuloma", "that's granuloma", 1.0),
])
def test_open_answers_use_the_contraction_table(prediction, reference, recall):
    assert llava_med_open_scores(prediction, reference)["recall"] == recall
    assert token_scores(prediction.replace("'", ""), reference.replace("'", ""))["recall"] == recall


@pytest.mark.parametrize("prediction, reference, exact, corrected_exact", [
    ("necrosis", "coagulative necrosis", 1.0, 0.0),  # 1 reference word found / 1 prediction word
    ("necrosis with necrosis and hemorrhage", "necrosis", 0.2, 0.0),  # 1 distinct word found / 5 words
    ("The granuloma.", "granuloma", 1.0, 1.0),
    ("granuloma", "caseating granuloma with giant cells", 1.0, 0.0),
])
def test_open_exact_match_is_matched_reference_words_over_prediction_words(prediction, reference, exact,
                                                                           corrected_exact):
    assert llava_med_open_scores(prediction, reference)["exact_match"] == pytest.approx(exact)
    assert corrected_open_scores(prediction, reference)["exact_match"] == corrected_exact


def test_open_true_positives_count_the_predictions_repeats_upstream_and_are_clipped_in_ours():
    official, corrected = llava_med_open_scores("gland gland", "gland"), corrected_open_scores("gland gland", "gland")
    assert (official["precision"], official["recall"]) == (1.0, 1.0)  # tp = 2 (the prediction's count), fp = 0
    assert (corrected["precision"], corrected["recall"]) == (0.5, 1.0)
    assert llava_med_open_scores("", "necrosis")["recall"] == 0.0


def test_the_quilt_and_pathvqa_open_rules_are_the_same_functions():
    record = MCQRecord(question="q", answer="a nodular pattern of epithelioid histiocytes", answer_type="open")
    answer = "Nodular pattern, dont know."
    quilt = get_benchmark("quilt-vqa").rules.official(record, answer, random.Random(0))
    pathvqa = get_benchmark("pathvqa").rules.official(record, answer, random.Random(0))
    assert quilt == pathvqa and quilt.correct is None
    # "nodular", "pattern" of 5 reference words (a goes); prediction words: nodular pattern don't know
    assert quilt.metrics["recall"] == pytest.approx(2 / 5) and quilt.metrics["precision"] == pytest.approx(2 / 4)
