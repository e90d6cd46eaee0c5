"""Evaluation: answer extraction, VLMEvalKit's matching rules, the built-in scorer, the VLMEvalKit model class, the
LLM judge."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from patho_r1.data import MCQRecord
from patho_r1.errors import ConfigError
from patho_r1.eval.benchmarks import evaluate_benchmark, get_benchmark
from patho_r1.eval.generation import SamplingConfig
from patho_r1.eval.judge import LLMJudge
from patho_r1.eval.matching import can_infer, exact_match_mcq
from patho_r1.eval.scoring import score_responses
from patho_r1.eval.vlmeval_hook import PathoR1VLMCore
from patho_r1.rewards.parsing import extract_final_answer, split_thinking

OPTIONS = {"A": "adenocarcinoma", "B": "lymphocytic infiltrate", "C": "mucinous pools", "D": "adipose tissue"}

# (raw model output, what the hook returns)
EXTRACTION = [
    ("<think>rings of nuclei</think><answer>A</answer>", "A"),
    ("<think>x</think>\n<answer> C </answer>\n", "C"),
    ("<think>x</think><answer>A</answer> then <answer>D</answer>", "D"),  # the last answer block wins
    ("<think>considering B and C</think> D", "D"),  # no answer tag: text after </think>
    ("<think>x</think><answer>B", "B"),  # unclosed answer after the think block
    ("D", "D"),
    ("", ""),
    ("<answer>mucinous pools</answer>", "mucinous pools"),
    ("<think>glands crowd, so A. Then maybe", ""),  # cut off inside the reasoning: no answer, and no letter leaks
    ("<THINK>x</THINK><ANSWER>C</ANSWER>", "C"),  # upper-case tags
    ("<think>x</think><Answer> B </Answer>", "B"),
    ("<think>x</think>B</answer>", "B"),  # a stray closing tag never reaches the matcher
]

# (prediction, VLMEvalKit's can_infer result) — read from vlmeval/utils/matching_util.py (ms-vlmeval 0.0.20)
VLMEVAL_RULES = [
    ("B", "B"),
    ("The answer is B.", "B"),
    ("(C) mucinous pools", "C"),
    ("Answer: D", "D"),
    ("A or B", False),  # two option letters: ambiguous
    ("mucinous pools", "C"),  # option text, matched when unique
    ("adenocarcinoma or adipose tissue", False),  # two option texts
    ("Cannot determine the answer", "Z"),
    ("<answer>B</answer>", False),  # tags are not stripped: the letter is invisible to the matcher
    ("B is likely, since " + "the glands are crowded " * 10, False),  # letter too early in a long answer
]


@pytest.mark.parametrize("raw,expected", EXTRACTION)
def test_final_answer_extraction(raw, expected):
    assert extract_final_answer(raw) == expected


@pytest.mark.parametrize("prediction,expected", VLMEVAL_RULES)
def test_vlmeval_matching_rules(prediction, expected):
    assert can_infer(prediction, dict(OPTIONS)) == expected


def test_raw_reasoning_output_is_misscored_but_the_extracted_answer_is_not():
    raw = "<think>Not adenocarcinoma: no glands. Sheets of small cells.</think><answer>B</answer>"
    assert can_infer(raw, dict(OPTIONS)) == "A"  # the raw trace is read as option A through its text
    assert not exact_match_mcq(raw, OPTIONS, "B")
    assert exact_match_mcq(extract_final_answer(raw), OPTIONS, "B")
    assert split_thinking(raw) == ("B", "Not adenocarcinoma: no glands. Sheets of small cells.")


def _record(answer="B", answer_type="mcq", **kw):
    return MCQRecord(question="Which?", options=OPTIONS if answer_type == "mcq" else {}, answer=answer,
                     answer_type=answer_type, category=kw.get("category", "c"))


def test_scorer_agrees_with_vlmeval_exact_matching_on_the_same_predictions():
    responses = ["<think>x</think><answer>B</answer>", "<think>x</think><answer>C</answer>",
                 "<think>lymphocytic infiltrate</think> B", "B", "<think>x</think><answer>lymphocytic "
                 "infiltrate</answer>", "<think>x</think><answer>A or B</answer>"]
    records = [_record("B") for _ in responses]
    report, rows = score_responses(get_benchmark("mcq"), records, responses)  # the official rule: VLMEvalKit's
    ours = [r.correct for r in rows]
    # VLMEvalKit, fed what our VLMEvalKit hook returns for each response:
    theirs = [can_infer(extract_final_answer(r), dict(OPTIONS)) == "B" for r in responses]
    assert ours == theirs and sum(ours) == 4 and report["mcq"]["accuracy"] == round(4 / 6, 4)
    assert [r.scores["strict_correct"] for r in rows] == [True, False, False, False, False, False]
    assert [r.format_ok for r in rows] == [True, True, False, False, True, True]


def test_rule_table_against_the_real_vlmeval(vlmeval_scorers):
    assert [vlmeval_scorers.can_infer(p, dict(OPTIONS)) for p, _ in VLMEVAL_RULES] == [e for _, e in VLMEVAL_RULES]


def _prediction_corpus() -> list[tuple[str, str, dict]]:
    """(raw model output, gold letter, options): the forms real models write, for every option of two sets."""
    forms = ["{L}", "{L}.", "{L}. {T}", "({L})", "({L}) {T}", "The answer is {L}.", "Answer: {L}", "\\boxed{{{L}}}",
             "**{L}**", "{l}", "{L} or {M}", "{T}", "The tissue shows {T}.", "Option {L}", "{L}）", "{L}。", "（{L}）",
             "", "I think it is {L} because the cells are {T} and not {U}", "[{L}]"]
    wrapped = ["<think>x</think><answer>{inner}</answer>", "<think>maybe {M}, but</think><answer>{inner}</answer>",
               "<think>so {M}. Then", "{inner}"]
    option_sets = [OPTIONS, {"A": "necrosis", "B": "stroma", "C": "glands", "D": "fat", "E": "mucin"}]
    corpus = []
    for options in option_sets:
        letters = list(options)
        for i, letter in enumerate(letters):
            other = letters[(i + 1) % len(letters)]
            fill = dict(L=letter, l=letter.lower(), M=other, T=options[letter], U=options[other])
            for j, form in enumerate(forms):
                raw = wrapped[j % len(wrapped)].format(inner=form.format(**fill), **fill)
                corpus.append((raw, letter, options))
    return corpus


def test_mcq_verdicts_agree_with_vlmeval_on_150_plus_predictions(vlmeval_scorers):
    corpus = _prediction_corpus()
    assert len(corpus) >= 150
    for raw, gold, choices in corpus:
        prediction = extract_final_answer(raw)
        assert "<" not in prediction, raw  # no tag ever reaches the matcher
        ours = exact_match_mcq(prediction, choices, gold)
        theirs = vlmeval_scorers.can_infer(prediction, dict(choices)) == gold
        assert ours == theirs, (raw, prediction)


YESNO_CASES = [  # (prediction, gold, patho verdict, VLMEvalKit verdict)
    ("Yes", "Yes", True, True), ("yes", "yes", True, False),  # VLMEvalKit compares 'Yes' with 'yes': never equal
    ("No, there is no invasion.", "No", True, True), ("No, there is no invasion.", "no", True, False),
    ("**No**", "No", True, False), ("True", "Yes", True, False), ("false", "No", True, False),
    ("Yes, but no necrosis.", "Yes", True, False),  # both words: Unknown for VLMEvalKit
    ("There is no invasion", "No", True, True), ("Maybe", "Yes", False, False), ("", "No", False, False),
    ("YES.", "Yes", True, True), ("Not sure", "No", False, False), ("no", "Yes", False, False),
]


@pytest.mark.parametrize("prediction,gold,patho,vlmeval", YESNO_CASES)
def test_yes_no_in_both_modes(prediction, gold, patho, vlmeval):
    from patho_r1.eval.matching import vlmeval_yesno_correct
    from patho_r1.rewards.accuracy import score_yesno

    assert (score_yesno(prediction, gold) == 1.0) == patho
    assert vlmeval_yesno_correct(prediction, gold) == vlmeval


def test_the_vlmeval_yes_no_port_equals_vlmeval(vlmeval_scorers):
    from patho_r1.eval.matching import vlmeval_yesno_extract

    outputs = [p for p, *_ in YESNO_CASES] + ["yes/no", "No-show", "a (yes) b", "1,000 yes", "yes. no.", "nope"]
    assert [vlmeval_yesno_extract(o) for o in outputs] == [vlmeval_scorers.yorn_extraction(o) for o in outputs]


class _FixedGenerator:
    def __init__(self, outputs):
        self.outputs = outputs
        self.calls = 0

    def generate(self, requests, sampling):
        self.calls += 1
        return self.outputs[: len(requests)]


def test_yes_no_and_per_category_report():
    from patho_r1.eval.scoring import markdown

    records = [_record("yes", "yesno", category="x"), _record("no", "yesno", category="y")]
    generator = _FixedGenerator(["<think>t</think><answer>yes</answer>", "No."])
    report, rows = evaluate_benchmark(get_benchmark("mcq"), records, generator, SamplingConfig(), scorer="corrected")
    assert [r.correct for r in rows] == [True, True] and [r.scores["strict_correct"] for r in rows] == [True, False]
    # VLMEvalKit's verdict, the official one for our sets, compares its "Yes"/"No" with the gold's case: never "yes"
    assert [r.scores["official"]["correct"] for r in rows] == [False, False]
    assert report["chance"] == 0.5 and report["groups"]["category"]["y"]["closed"]["accuracy"] == 1.0
    assert report["closed"]["official"]["accuracy"] == 0.0 and report["closed"]["corrected"]["accuracy"] == 1.0
    assert "| x | 1.000 [" in markdown(report, "yes/no")


class _JudgeServer(BaseHTTPRequestHandler):
    def do_POST(self):  # http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        verdict = "Yes." if "Candidate answer: mucin" in prompt else "no"
        payload = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_open_questions_need_a_judge_and_use_it(monkeypatch):
    records = [_record("mucinous pools", "open"), _record("adipose tissue", "open")]
    for var in ("PATHO_JUDGE_BASE_URL", "OPENAI_API_BASE", "PATHO_JUDGE_MODEL", "LOCAL_LLM"):
        monkeypatch.delenv(var, raising=False)
    generator = _FixedGenerator(["<think>t</think><answer>mucin</answer>", "<answer>fat</answer>"])
    with pytest.raises(ConfigError, match="no LLM judge configured"):
        LLMJudge.from_env()  # what the eval phase asks before generating for a set with open questions
    server = HTTPServer(("127.0.0.1", 0), _JudgeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("PATHO_JUDGE_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("PATHO_JUDGE_MODEL", "judge")
        report, rows = evaluate_benchmark(get_benchmark("mcq"), records, generator, SamplingConfig(),
                                          llm_judge=LLMJudge.from_env())
    finally:
        server.shutdown()
    assert [r.correct for r in rows] == [True, False] and report["overall"]["accuracy"] == 0.5
    with pytest.raises(ConnectionError):
        LLMJudge(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m", timeout=1,
                 max_retries=0).is_correct("q", "a", "b")


def test_vlmeval_model_class_core_on_the_tiny_model(tiny_model_dir, world_dir, monkeypatch):
    from patho_r1.data import load_records

    rec = load_records(world_dir / "rl/heldout.jsonl", "mcq")[0]
    model = PathoR1VLMCore(str(tiny_model_dir), max_new_tokens=8, use_vllm=False, extra_kwarg="ignored")
    message = [dict(type="image", value=rec.images[0]), dict(type="text", value=rec.prompt_text())]
    request = model.to_request(message)
    assert request.messages[0]["role"] == "system" and len(request.images) == 1
    assert [p["type"] for p in request.messages[1]["content"]] == ["image", "text"]
    answer = model.generate_inner(message)
    assert answer == extract_final_answer(model.last_response)
    monkeypatch.setenv("SPLIT_THINK", "1")
    assert model.generate_inner(message) == model.last_response
    with pytest.raises(ValueError, match="unsupported"):
        model.to_request([dict(type="video", value="x.mp4")])


def test_eval_mcq_cli_writes_tables(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.launch.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "mcq", "--model", str(tiny_model_dir), "--data", str(world_dir / "eval/PathoSynth_MCQ.tsv"),
                 "--out", str(out), "--max-new-tokens", "8", "--limit", "6", "--label", "tiny"]) == 0
    report = json.loads((out / "tiny/results.json").read_text())["report"]
    rows = (out / "tiny/predictions.jsonl").read_text().splitlines()
    assert report["n"] == 6 and len(rows) == 6 and "accuracy" in (out / "summary.md").read_text()
    # the phase scored through the benchmarks' path: `eval score` on its predictions gives the same numbers
    assert main(["eval", "score", "--name", "mcq", "--data", str(world_dir / "eval/PathoSynth_MCQ.tsv"),
                 "--predictions", str(out / "tiny/predictions.jsonl"), "--out", str(tmp_path / "score")]) == 0
    again = json.loads((tmp_path / "score/results.json").read_text())["report"]
    for key in ("n", "overall", "official", "corrected", "mcq", "format_rate", "mean_response_tokens", "chance"):
        assert again[key] == report[key], key
    total = len((world_dir / "eval/PathoSynth_MCQ.tsv").read_text().splitlines()) - 1
    assert total > 6 and again["missing"] == total - 6 and report["missing"] == 0  # the phase scored the first 6
    assert len((tmp_path / "score/missing.jsonl").read_text().splitlines()) == total - 6


def test_eval_phase_names_a_bad_checkpoint_before_loading(world_dir, tmp_path):
    from patho_r1.eval.phase import EvalPhaseConfig, run_eval

    cfg = EvalPhaseConfig(data=str(world_dir / "eval/PathoSynth_MCQ.tsv"), output_dir=str(tmp_path),
                          checkpoints={"tiny": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="checkpoints.tiny: .*missing is not a model directory"):
        run_eval(cfg)


def test_a_truncated_trace_is_thinking_with_no_answer():
    assert split_thinking("<think>glands crowd, so A.") == ("", "glands crowd, so A.")
    assert split_thinking("<THINK>x</THINK><ANSWER>C</ANSWER>") == ("C", "x")


def test_image_blind_chance_is_the_best_rule_that_ignores_the_image():
    from patho_r1.eval.mcq import blind_chance

    opts = {"A": "stroma", "B": "glands", "C": "fat", "D": "necrosis"}
    # the commonest letter is right 2 times in 5 (0.4); "always say glands" is right 3 times in 5 (0.6)
    records = [MCQRecord(question="q", options=o, answer=a) for o, a in [
        (opts, "B"), (opts, "B"), ({"A": "glands", "B": "fat", "C": "stroma", "D": "x"}, "A"), (opts, "C"),
        (opts, "D")]]
    assert blind_chance(records) == pytest.approx(0.6)
    yesno = [MCQRecord(question="q", answer=a, answer_type="yesno") for a in ("yes", "Yes", "no", "yes")]
    assert blind_chance(yesno) == pytest.approx(0.75)


def test_mcnemar_matches_the_exact_binomial_by_hand():
    from patho_r1.eval.stats import mcnemar

    a = [True] * 10 + [False] * 10 + [True, False, False, False, False, False]
    b = [True] * 10 + [False] * 10 + [False, True, True, True, True, True]
    result = mcnemar("sft", "rl", a, b)
    assert (result["gained"], result["lost"]) == (5, 1)
    # two-sided exact: 2 * P(X <= 1) for X ~ Binomial(6, 1/2) = 2 * 7/64
    assert result["p_value"] == pytest.approx(14 / 64)
    assert mcnemar("a", "b", [True, False], [True, False])["p_value"] == 1.0


def test_wrong_images_move_every_image_to_another_item():
    from patho_r1.eval.phase import wrong_images

    records = [MCQRecord(question=f"q{i}", options={"A": "x", "B": "y"}, answer="A", images=[f"img{i}.png"])
               for i in range(7)]
    shuffled = wrong_images(records, seed=3)
    assert [r.question for r in shuffled] == [r.question for r in records]  # same items, same order
    assert all(s.images != r.images for s, r in zip(shuffled, records, strict=True))  # nobody keeps its own
    assert sorted(s.images[0] for s in shuffled) == sorted(r.images[0] for r in records)  # a permutation
    assert wrong_images(records, seed=3) == shuffled  # seeded


def test_eval_phase_writes_the_control_and_the_paired_tests(tiny_model_dir, world_dir, tmp_path):
    from patho_r1.eval.phase import EvalPhaseConfig, run_eval

    cfg = EvalPhaseConfig(data=str(world_dir / "eval/PathoSynth_MCQ.tsv"), output_dir=str(tmp_path), limit=6,
                          checkpoints={"a": str(tiny_model_dir), "b": str(tiny_model_dir)}, max_new_tokens=4,
                          wandb={"mode": "disabled"})
    summary = run_eval(cfg).metrics["summary"]
    assert {"wrong_image_accuracy", "uniform_chance", "chance"} <= set(summary["a"])
    paired = json.loads((tmp_path / "paired.json").read_text())
    per_class = paired[0].pop("per_class")  # the set's gold options name classes: a test within each
    assert paired == [{"from": "a", "to": "b", "gained": 0, "lost": 0, "p_value": 1.0}]  # same model, same answers
    assert sum(c["n"] for c in per_class.values()) == 6
    assert all((c["gained"], c["lost"], c["p_value"]) == (0, 0, 1.0) for c in per_class.values())
    assert (tmp_path / "a/wrong_image/predictions.jsonl").is_file()
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert len(samples) == 6 and all(set(s["responses"]) == {"a", "b"} for s in samples)
    assert all(s["thumbnail"].startswith("data:image/png;base64,") for s in samples)


def test_the_judge_never_shows_its_api_key():
    judge = LLMJudge(base_url="http://127.0.0.1:1/v1", model="m", api_key="sk-secret-key-123")
    assert "sk-secret" not in repr(judge) and "sk-secret" not in str(judge)


def _pathvqa_tsv(path, rows) -> None:
    import base64
    import csv
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["index", "image", "question", "answer"])
        w.writerows([(i, b64, q, a) for i, (q, a, _) in enumerate(rows)])


def test_vlmeval_scores_pathvqa_through_our_judge_endpoint_and_finds_tsv_predictions(vlmeval_judge_stack, tmp_path,
                                                                                      monkeypatch):
    """VLMEvalKit's own PathVQA_VAL evaluation, judge included, pointed at an OpenAI-compatible server the way
    `run_vlmeval --judge-url` does; its verdicts agree with our judge's on the same answers, and the predictions are
    found under PRED_FORMAT=tsv (the path that was hard-coded to .xlsx)."""
    import csv

    from patho_r1.eval.judge import LLMJudge
    from patho_r1.eval.vlmeval_hook import pred_file, vlmeval_judge_kwargs
    from patho_r1.fixtures.teacher import serve

    rows = [("what is present?", "granuloma", "a granuloma with giant cells"),
            ("what does this image show?", "lymphoid hyperplasia", "necrosis"),
            ("what is seen?", "fat necrosis", "fat necrosis with saponification"),
            ("which cells?", "plasma cells", "lymphocytes")]
    monkeypatch.setenv("LMUData", str(tmp_path / "lmu"))
    monkeypatch.setenv("PRED_FORMAT", "tsv")
    (tmp_path / "lmu").mkdir()
    _pathvqa_tsv(tmp_path / "lmu" / "PathVQA_VAL.tsv", rows)
    dataset = vlmeval_judge_stack.PathVQA_VAL("PathVQA_VAL")
    path = pred_file(str(tmp_path / "work"), "patho-r1", "PathVQA_VAL")
    assert path.suffix == ".tsv"
    path.parent.mkdir()
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["index", "question", "answer", "prediction"])
        w.writerows([(i, q, a, p) for i, (q, a, p) in enumerate(rows)])
    server = serve()
    try:
        acc = dataset.evaluate(str(path), **vlmeval_judge_kwargs("scripted", server.url, None, nproc=1))
        ours = LLMJudge(base_url=server.url, model="scripted").verdicts(rows)
    finally:
        server.stop()
    import pandas as pd

    judged = pd.read_csv(path.with_name(path.stem + "_judge.tsv"), sep="\t")
    assert list(judged["hit"]) == [v.correct for v in ours] == [True, False, True, False]
    assert float(acc["Overall"].iloc[0]) == pytest.approx(0.5)  # its overall accuracy, from the same hits


def test_run_vlmeval_refuses_a_short_answer_set_without_a_judge_before_inference():
    from patho_r1.eval.vlmeval_hook import check_vlmeval_judge, vlmeval_judge_kwargs

    with pytest.raises(ValueError, match="short-answer set.*--judge-url"):
        check_vlmeval_judge("PathVQA_VAL", "Short", "exact_matching", None)
    check_vlmeval_judge("PathVQA_VAL", "Short", "qwen-judge", "http://127.0.0.1:1/v1")  # a judge endpoint: fine
    check_vlmeval_judge("PathMMU_VAL", "MCQ", "exact_matching", None)  # MCQ: exact matching is enough
    assert vlmeval_judge_kwargs("m", "http://h:1/v1/", None)["api_base"] == "http://h:1/v1/chat/completions"
    assert vlmeval_judge_kwargs("exact_matching", None, None) == {"model": "exact_matching", "nproc": 4}


def test_vlmeval_judge_log_line_never_carries_the_api_key(vlmeval_judge_stack, caplog):
    import logging

    from vlmeval.smp import get_logger

    from patho_r1.eval.vlmeval_hook import RedactKey

    logger = get_logger("vlmeval.api.gpt")
    logger.addFilter(RedactKey("sk-planted-secret"))
    # RedactKey alone: an earlier test's client may have installed patho_r1.redact's process-wide record factory,
    # which would mask the key before this filter sees it
    factory = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            vlmeval_judge_stack.build_judge(model="judge", api_base="http://127.0.0.1:1/v1/chat/completions",
                                            key="sk-planted-secret")
    finally:
        logging.setLogRecordFactory(factory)
    assert "API Key: ***" in caplog.text and "sk-planted-secret" not in caplog.text


def _bench_row(i: int, gold: str, correct: bool):
    from patho_r1.eval.scoring import BenchRow

    options = {"A": "stroma", "B": "necrosis", "C": "tumour"}
    letter = next(k for k, v in options.items() if v == gold)
    return BenchRow(id=f"q{i}", groups={}, question="Which tissue?", answer_type="mcq", answer=letter,
                    options=options, prediction=letter if correct else "A", response="<answer>x</answer>",
                    correct=correct, format_ok=True, response_tokens=3)


def test_the_paired_test_is_run_within_each_class_too():
    """The per-class McNemar test equals scipy's exact binomial test on that class's discordant items."""
    import random

    from scipy.stats import binomtest

    from patho_r1.eval.phase import paired_test

    rng = random.Random(0)
    golds = [rng.choice(["stroma", "necrosis", "tumour"]) for _ in range(90)]
    a = [_bench_row(i, g, rng.random() < 0.6) for i, g in enumerate(golds)]
    b = [_bench_row(i, g, (g != "necrosis") and rng.random() < 0.8) for i, g in enumerate(golds)]
    test = paired_test("sft", "rl", a, b)
    assert set(test["per_class"]) == {"stroma", "necrosis", "tumour"}
    for name, part in test["per_class"].items():
        items = [i for i, g in enumerate(golds) if g == name]
        gained = sum(1 for i in items if b[i].correct and not a[i].correct)
        lost = sum(1 for i in items if a[i].correct and not b[i].correct)
        assert (part["gained"], part["lost"], part["n"]) == (gained, lost, len(items))
        expected = binomtest(gained, gained + lost, 0.5).pvalue if gained + lost else 1.0
        assert part["p_value"] == pytest.approx(expected)
    assert test["per_class"]["necrosis"]["gained"] == 0 and test["per_class"]["necrosis"]["p_value"] < 0.01
    # yes/no items have no option classes: no per-class test
    yesno = [r.__class__(**{**r.__dict__, "options": {}, "answer": "yes"}) for r in a]
    assert "per_class" not in paired_test("sft", "rl", yesno, yesno)


def test_sample_generations_are_seeded_half_failures_and_the_same_items_for_every_checkpoint(tmp_path):
    from PIL import Image

    from patho_r1.data import MCQRecord
    from patho_r1.eval.phase import sample_generations

    Image.new("RGB", (300, 200), (200, 100, 150)).save(tmp_path / "t.png")
    records = [MCQRecord(question="Which tissue?", answer="B", options={"A": "stroma", "B": "necrosis"},
                         images=[str(tmp_path / "t.png")]) for _ in range(20)]
    base = [_bench_row(i, "necrosis", False) for i in range(20)]
    rl = [_bench_row(i, "necrosis", i % 4 != 0) for i in range(20)]  # 5 failures
    samples = sample_generations(records, {"base": base, "rl": rl}, seed=3)
    assert samples == sample_generations(records, {"base": base, "rl": rl}, seed=3)  # seeded
    assert len(samples) == 6 and sum(not s["responses"]["rl"]["correct"] for s in samples) == 3
    assert all(set(s["responses"]) == {"base", "rl"} for s in samples)
    assert samples[0]["thumbnail"].startswith("data:image/png;base64,")
    import base64
    import io

    thumb = Image.open(io.BytesIO(base64.b64decode(samples[0]["thumbnail"].split(",", 1)[1])))
    assert max(thumb.size) == 128
