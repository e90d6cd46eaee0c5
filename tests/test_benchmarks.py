"""`patho-r1 eval bench`: the public benchmarks read from fixtures in their own formats, scored by their own rules
(PathMMU's parser, LLaVA-Med's token metrics, VLMEvalKit's matching), with numbers checked against hand counts."""

from __future__ import annotations

import json
import random

import pytest

from patho_r1.errors import DataError
from patho_r1.eval.benchmarks import (
    BENCHMARKS,
    CHAIN_OF_DRAFT_PROMPT,
    evaluate_benchmark,
    get_benchmark,
    load_benchmark,
)
from patho_r1.eval.generation import SamplingConfig
from patho_r1.eval.matching import corrected_open_scores, pathmmu_choice
from patho_r1.eval.scoring import markdown
from patho_r1.fixtures import public_formats
from patho_r1.fixtures.teacher import serve
from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT


class ScriptedModel:
    """A generator that answers from a table (a key found in the question picks the reply) or from a list in row
    order: the scorer's input is known, so its numbers can be counted by hand."""

    def __init__(self, replies: dict[str, str] | list[str]):
        self.replies = replies
        self.order = iter(replies) if isinstance(replies, list) else None

    def generate(self, requests, sampling):
        if self.order is not None:
            return [next(self.order) for _ in requests]
        texts = [r.messages[-1]["content"][-1]["text"] for r in requests]
        return [next(v for k, v in self.replies.items() if k in text) for text in texts]


# ----------------------------------------------------------------------------------------------------------------------
# Reading each benchmark through its own reader
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, writer, n, skipped, filtered", [
    ("pathmmu", "pathmmu", 3, 1, 0),
    ("pathvqa", "pathvqa", 4, 1, 0),
    ("quilt-vqa", "quilt_vqa", 2, 0, 0),
    ("medxpertqa-mm", "medxpertqa_mm", 3, 1, 0),
    ("omnimedvqa-path", "omnimedvqa", 2, 1, 1),  # the CT row is not microscopy
    ("pathmmu", "vlmeval_tsv", 2, 1, 0),  # a VLMEvalKit TSV is read as one whatever the benchmark
])
def test_each_benchmark_reads_its_release_format_and_counts_what_it_skips(name, writer, n, skipped, filtered,
                                                                           tmp_path):
    src, _ = getattr(public_formats, writer)(tmp_path)
    loaded = load_benchmark(get_benchmark(name), src, on_error="skip")
    assert (len(loaded.records), len(loaded.skipped), loaded.filtered) == (n, skipped, filtered)
    assert all(s["file"] and s["row"] and s["error"] for s in loaded.skipped)
    assert all(r.images for r in loaded.records)


def test_a_bad_benchmark_row_fails_naming_file_row_and_field_unless_skipped(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path)
    with pytest.raises(DataError) as err:
        load_benchmark(get_benchmark("pathmmu"), src)
    assert err.value.field == "img" and "[SocialPath][test]" in err.value.path and err.value.row == 1
    assert "rebuilt from their sources" in str(err.value)
    # the same release read for the subsets it ships images for needs no skipping
    loaded = load_benchmark(get_benchmark("pathmmu"), src, subsets=["PubMed"])
    assert len(loaded.records) == 3 and loaded.filtered == 1 and not loaded.skipped


def test_on_error_is_spelled_as_the_importer_spells_it_and_the_old_fail_still_works(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path)
    with pytest.raises(DataError):
        load_benchmark(get_benchmark("pathmmu"), src, on_error="raise")
    with pytest.warns(DeprecationWarning, match="on_error='fail' is deprecated; use 'raise'"), \
            pytest.raises(DataError):
        load_benchmark(get_benchmark("pathmmu"), src, on_error="fail")
    with pytest.raises(ValueError, match="on_error must be one of raise, skip, got 'ignore'"):
        load_benchmark(get_benchmark("pathmmu"), src, on_error="ignore")


def test_the_cli_choices_are_the_registries():
    """`eval bench`'s flags list what the tables hold: a benchmark, prompt, scorer or filter added there is a choice."""
    import argparse

    from patho_r1.eval.benchmarks import ON_ERROR, PROMPTS, QUESTION_FILTERS
    from patho_r1.eval.cli import register
    from patho_r1.eval.generation import ENGINES
    from patho_r1.eval.rules import SCORERS

    parser = argparse.ArgumentParser()
    top = parser.add_subparsers()
    register(top)
    commands = next(a for a in top.choices["eval"]._actions if isinstance(a, argparse._SubParsersAction))
    bench = commands.choices["bench"]
    choices = {a.dest: list(a.choices) for a in bench._actions if a.choices}
    assert choices["name"] == list(BENCHMARKS) and choices["prompt"] == list(PROMPTS)
    assert choices["scorer"] == list(SCORERS) and choices["question_filter"] == list(QUESTION_FILTERS)
    assert choices["engine"] == list(ENGINES) and choices["on_error"] == [*ON_ERROR, "fail"]
    args = parser.parse_args(["eval", "bench", "--name", "pathmmu", "--data", "d", "--model", "m"])
    assert args.on_error == "raise"


def test_medxpertqa_rows_keep_their_labels_and_the_pathology_filter_is_a_keyword_subset(tmp_path):
    src, _ = public_formats.medxpertqa_mm(tmp_path)
    loaded = load_benchmark(get_benchmark("medxpertqa-mm"), src, on_error="skip")
    by_id = {r.id: r for r in loaded.records}
    assert by_id["medxpertqa:MM-0"].answer == "C" and len(by_id["medxpertqa:MM-0"].options) == 5
    # the HF row's "Answer Choices: (A) ..." tail is cut: the options are rendered once, from `options`
    assert by_id["medxpertqa:MM-1"].question == "Which drug is first line?"
    assert by_id["medxpertqa:MM-1"].options["B"] == "drug b"
    path = load_benchmark(get_benchmark("medxpertqa-mm"), src, on_error="skip", question_filter="pathology")
    assert [r.id for r in path.records] == ["medxpertqa:MM-0"]  # "biopsy ... H&E"; the radiograph is out


def test_omnimedvqa_maps_the_gold_option_text_to_its_letter(tmp_path):
    src, _ = public_formats.omnimedvqa(tmp_path)
    loaded = load_benchmark(get_benchmark("omnimedvqa-path"), src, on_error="skip")
    assert [(r.id, r.answer, len(r.options)) for r in loaded.records] == [("omnimedvqa:BreakHis_0", "B", 4),
                                                                          ("omnimedvqa:BreakHis_1", "B", 2)]
    assert loaded.skipped[0]["field"] == "gt_answer" and loaded.skipped[0]["row"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# The upstream rules, against hand-worked cases
# ----------------------------------------------------------------------------------------------------------------------

PATHMMU_OPTIONS = {"A": "Adenocarcinoma", "B": "Lymphoma (diffuse)", "C": "Melanoma", "D": "Both A and B"}


@pytest.mark.parametrize("response, letter, parsed", [
    ("(B)", "B", True),
    ("The answer is B.", "B", True),  # trailing '.' stripped, then " B "
    ("A or maybe (C)", "C", True),  # a bracketed letter beats a bare one
    ("(A) at first, but on reflection (C)", "C", True),  # several: the last one placed
    ("It is most consistent with lymphoma (diffuse) given the sheets", "B", True),  # option text, > 5 words
    ("lymphoma (diffuse)", None, False),  # option text in <= 5 words is not read: a guess
    ("A lymphoma is seen in this slide", "A", True),  # upstream quirk: the article "A" is a letter
])
def test_pathmmu_parser_matches_the_upstream_rules(response, letter, parsed):
    rng = random.Random(42)
    got, ok = pathmmu_choice(response, PATHMMU_OPTIONS, rng)
    assert ok is parsed
    if letter is None:  # upstream: random.seed(42), then random.choice over the letters
        assert got == random.Random(42).choice(list("ABCD"))
    else:
        assert got == letter


def test_open_token_metrics_by_hand():
    s = corrected_open_scores("The nodular pattern, of histiocytes.",
                              "A nodular pattern of epithelioid histiocytes surrounding necrosis.")
    # 4 shared words, none extra; 3 reference words missed
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(4 / 7) and s["f1"] == pytest.approx(8 / 11)
    assert corrected_open_scores("two", "2")["recall"] == 1.0  # number words become digits
    assert corrected_open_scores("3.5 mm", "3.5 mm")["f1"] == 1.0  # a decimal point survives
    assert corrected_open_scores("", "necrosis") == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "exact_match": 0.0}


def test_prompt_modes_set_the_system_prompt_and_the_benchmark_layout(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path)
    bench = get_benchmark("pathmmu")
    record = load_benchmark(bench, src, subsets=["PubMed"]).records[0]
    cot, cod, direct = (bench.request(record, m).messages for m in ("cot", "cod", "direct"))
    assert cot[0]["content"] == REASONING_SYSTEM_PROMPT and cod[0]["content"] == CHAIN_OF_DRAFT_PROMPT
    assert direct[0]["role"] == "user"  # no system prompt
    text = direct[-1]["content"][-1]["text"]
    assert "(B) Lymphoma (diffuse)" in text and text.endswith("from the given choices directly.")
    assert not cot[-1]["content"][-1]["text"].endswith("directly.")
    assert direct[-1]["content"][0] == {"type": "image"}


# ----------------------------------------------------------------------------------------------------------------------
# Whole runs with a scripted model: the tables, counted by hand
# ----------------------------------------------------------------------------------------------------------------------

def test_pathmmu_table_by_subset_and_split_with_intervals_and_the_guess_count(tmp_path):
    src, _ = public_formats.pathmmu(tmp_path)
    bench = get_benchmark("pathmmu")
    records = load_benchmark(bench, src, on_error="skip").records
    gold = {r.id: r.answer for r in records}
    assert gold == {"pathmmu:PubMed:val:0": "B", "pathmmu:PubMed:test:1": "D", "pathmmu:PubMed:test:2": "C"}
    # the three share a question, so the replies come in row order
    model = ScriptedModel(["<think>sheets of lymphoid cells</think><answer>(B)</answer>",
                           "<think>glands</think><answer>A</answer>", "<think>?</think><answer>not sure</answer>"])
    report, rows = evaluate_benchmark(bench, records, model, SamplingConfig(batch_size=2))
    guess_right = random.Random(42).choice(list("ABCD")) == "C"
    assert [r.correct for r in rows] == [True, False, guess_right]
    assert report["mcq"]["guessed"] == 1 and report["mcq"]["n"] == 3
    assert report["mcq"]["unread"] == {"official": 1, "corrected": 1}
    assert report["mcq"]["corrected"]["accuracy"] == round(1 / 3, 4)
    assert report["mcq"]["accuracy"] == round((1 + guess_right) / 3, 4)
    assert report["mcq"]["strict_accuracy"] == 0.0  # "(B)" is not the bare letter the RL reward asks for
    assert report["mcq"]["vlmeval_accuracy"] == round(1 / 3, 4)  # can_infer reads "(B)"; nothing from "not sure"
    cells = report["cross"]["cells"]
    assert cells["val"]["PubMed"]["accuracy"] == 1.0 and cells["test"]["PubMed"]["n"] == 2
    lo, hi = report["mcq"]["ci95"]
    assert lo < report["mcq"]["accuracy"] < hi
    table = markdown(report, "pathmmu")
    assert "| split \\ category | overall | PubMed |" in table and "(n=2)" in table


def test_pathvqa_closed_and_open_with_recall_and_a_real_judge_server(tmp_path):
    from patho_r1.eval.judge import LLMJudge

    src, _ = public_formats.pathvqa(tmp_path)
    bench = get_benchmark("pathvqa")
    records = load_benchmark(bench, src, on_error="skip").records
    model = ScriptedModel({
        "benign tumor": "<think>well circumscribed</think><answer>Yes, it is benign.</answer>",
        "nuclei enlarged": "<think>large nuclei</think><answer>yes</answer>",
        "image show": "<think>follicles</think><answer>reactive lymphoid hyperplasia</answer>",
        "what is present": "<think>dead tissue</think><answer>necrosis</answer>",
    })
    server = serve()
    try:
        judge = LLMJudge(base_url=server.url, model="scripted", cache=str(tmp_path / "cache.jsonl"))
        report, rows = evaluate_benchmark(bench, records, model, SamplingConfig(batch_size=2), llm_judge=judge)
        again, _ = evaluate_benchmark(bench, records, model, SamplingConfig(batch_size=2), llm_judge=judge)
    finally:
        server.stop()
    assert report["closed"]["n"] == 2 and report["closed"]["accuracy"] == 0.5  # "Yes, it is benign." is right
    assert report["open"]["n"] == 2
    assert report["open"]["recall"] == 0.5  # 1.0 (both gold words said) and 0.0
    assert report["open"]["f1"] == 0.4  # precision 2/3, recall 1 -> 0.8; and 0
    # LLaVA-Med's "exact match": 2 reference words found / 3 prediction words, and 0; ours: equality, never here
    assert report["open"]["exact_match"] == round(2 / 3 / 2, 4) and report["open"]["corrected"]["exact_match"] == 0.0
    assert report["open"]["judge_accuracy"]["accuracy"] == 0.5  # the judge accepts the hyperplasia, not the necrosis
    assert again == report and judge.cache_hits == 2  # the second run asked the judge nothing
    by_split = report["groups"]["split"]
    assert by_split["train"]["closed"]["n"] == 2 and by_split["train"]["open_n"] == 1
    assert by_split["train"]["open_recall"] == 1.0 and by_split["test"]["open_recall"] == 0.0
    assert by_split["test"]["closed"] is None and by_split["test"]["open_judge_accuracy"]["accuracy"] == 0.0
    # the corrected scorer heads the same report with its own numbers; both columns are always there
    corrected, _ = evaluate_benchmark(bench, records, model, SamplingConfig(), scorer="corrected")
    assert corrected["scorer"] == "corrected" and corrected["open"]["exact_match"] == 0.0
    assert corrected["closed"]["official"] == report["closed"]["official"]


def test_open_answers_without_a_judge_still_get_recall_and_say_the_judge_did_not_run(tmp_path):
    src, _ = public_formats.quilt_vqa(tmp_path)
    bench = get_benchmark("quilt-vqa")
    records = load_benchmark(bench, src).records
    model = ScriptedModel({"granuloma": "<answer>yes</answer>",
                           "pattern": "<answer>nodular epithelioid histiocytes around necrosis</answer>"})
    report, _ = evaluate_benchmark(bench, records, model, SamplingConfig())
    assert report["closed"]["accuracy"] == 1.0 and report["open"]["judge_accuracy"] is None
    # reference: "a nodular pattern of epithelioid histiocytes surrounding necrosis" -> 7 words after "a" goes;
    # shared: nodular, epithelioid, histiocytes, necrosis
    assert report["open"]["recall"] == round(4 / 7, 4)
    assert "not run (no judge)" in markdown(report, "quilt")


def test_the_cli_scores_pathmmu_on_the_tiny_model_and_writes_every_file(tiny_model_dir, tmp_path, capsys):
    from patho_r1.launch.cli import main

    src, _ = public_formats.pathmmu(tmp_path / "src")
    out = tmp_path / "bench"
    assert main(["eval", "bench", "--name", "pathmmu", "--data", str(src), "--model", str(tiny_model_dir),
                 "--out", str(out), "--on-error", "skip", "--max-new-tokens", "8", "--prompt", "direct"]) == 0
    report = json.loads((out / "results.json").read_text())["report"]
    assert report["n"] == 3 and report["skipped"] == 1 and report["prompt"] == "direct"
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["question"] and "response" in r for r in rows)
    assert json.loads((out / "skipped.jsonl").read_text())["field"] == "img"
    assert "pathmmu" in (out / "results.md").read_text()
    assert "1 bad rows skipped" in capsys.readouterr().out


def test_every_registered_benchmark_names_a_known_reader_and_the_cli_offers_each():
    import argparse

    from patho_r1.eval.cli import register
    from patho_r1.formats import all_formats

    assert {b.format for b in BENCHMARKS.values()} - {None} <= set(all_formats())  # None: our own MCQ sets
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "bench", "--name", "pathmmu", "--data", "d", "--model", "m"])
    bench_parser = next(a for a in parser._subparsers._group_actions[0].choices["eval"]._subparsers._group_actions
                        if a.choices and "bench" in a.choices).choices["bench"]
    name_choices = next(a.choices for a in bench_parser._actions if a.dest == "name")
    assert args.name == "pathmmu" and sorted(name_choices) == sorted(BENCHMARKS)


def test_bench_with_a_judge_then_the_rubric_cli_on_its_predictions(tiny_model_dir, tmp_path, capsys):
    """`eval bench` on PathVQA with the judge flags (a real HTTP server), then `eval rubric` on the predictions it
    wrote: ten criteria per chain, hand-computable because the scripted judge scores by rule."""
    from patho_r1.eval.scoring import write_results
    from patho_r1.launch.cli import main

    src, _ = public_formats.pathvqa(tmp_path / "src")
    server = serve()
    try:
        out = tmp_path / "bench"
        assert main(["eval", "bench", "--name", "pathvqa", "--data", str(src), "--model", str(tiny_model_dir),
                     "--out", str(out), "--on-error", "skip", "--max-new-tokens", "4", "--judge-url", server.url,
                     "--judge-model", "scripted"]) == 0
        report = json.loads((out / "results.json").read_text())["report"]
        assert report["judge_model"] == "scripted" and report["open"]["judge_accuracy"]["n"] == 2
        assert (out / "judge_cache.jsonl").read_text().count("\n") == 2

        # the rubric, on predictions whose reasoning names the gold in one of four chains
        bench = get_benchmark("pathvqa")
        records = load_benchmark(bench, src, on_error="skip").records
        model = ScriptedModel({"benign tumor": "<think>benign</think><answer>x</answer>",
                               "image show": "<think>lymphoid hyperplasia is seen</think><answer>x</answer>",
                               "nuclei": "<think>small</think><answer>x</answer>",
                               "present": "<think>pink</think><answer>x</answer>"})
        rep, rows = evaluate_benchmark(bench, records, model, SamplingConfig())
        write_results(tmp_path / "scripted", rep, rows, "scripted")
        assert main(["eval", "rubric", "--predictions", str(tmp_path / "scripted" / "predictions.jsonl"),
                     "--judge-url", server.url, "--judge-model", "scripted", "--out", str(tmp_path / "r.json")]) == 0
    finally:
        server.stop()
    rubric = json.loads((tmp_path / "r.json").read_text())
    assert rubric["scored"] == 4 and len(rubric["mean_per_criterion"]) == 10
    assert rubric["mean_per_criterion"]["factual_accuracy"] == (8 + 3 * 3) / 4
    assert rubric["total"] == 42.5
    assert "total 42.5 / 100" in capsys.readouterr().out


def test_synth_data_writes_every_public_sample_once_and_refuses_to_write_over_them(tmp_path, capsys):
    from patho_r1.fixtures.public_formats import WRITERS
    from patho_r1.launch.cli import main

    assert main(["synth-data", str(tmp_path / "samples"), "--public-formats"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert set(paths) == set(WRITERS) and all((tmp_path / "samples" / name).is_dir() for name in paths)
    assert main(["synth-data", str(tmp_path / "samples"), "--public-formats"]) == 2
    assert "is not empty" in capsys.readouterr().err
