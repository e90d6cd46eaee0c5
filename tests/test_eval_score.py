"""`patho-r1 eval score`: predictions made elsewhere (ours, `{id, prediction}` JSONL, VLMEvalKit's files) scored
through the same path as `eval bench`, with bad input named by file and row, missing predictions counted, and the
per-class table of a classification set counted by hand."""

from __future__ import annotations

import json
import random

import pytest

from patho_r1.data import MCQRecord
from patho_r1.eval.benchmarks import get_benchmark
from patho_r1.eval.scoring import score_responses
from patho_r1.fixtures import public_formats
from patho_r1.launch.cli import main

REPORT_NUMBERS = ("n", "overall", "official", "corrected", "mcq", "closed", "open", "classes", "groups", "cross",
                  "format_rate", "mean_response_tokens", "chance", "uniform_chance", "missing", "strict_accuracy")


def _numbers(out) -> dict:
    report = json.loads((out / "results.json").read_text())["report"]
    return {k: report.get(k) for k in REPORT_NUMBERS}


def test_score_of_bench_predictions_gives_the_bench_numbers(tiny_model_dir, tmp_path):
    src, _ = public_formats.pathmmu(tmp_path / "src")
    bench, score = tmp_path / "bench", tmp_path / "score"
    assert main(["eval", "bench", "--name", "pathmmu", "--data", str(src), "--model", str(tiny_model_dir),
                 "--out", str(bench), "--on-error", "skip", "--max-new-tokens", "6", "--prompt", "direct"]) == 0
    assert main(["eval", "score", "--name", "pathmmu", "--data", str(src), "--on-error", "skip",
                 "--predictions", str(bench / "predictions.jsonl"), "--out", str(score)]) == 0
    assert _numbers(score) == _numbers(bench)
    assert sorted(p.name for p in score.iterdir()) == sorted(p.name for p in bench.iterdir())
    assert (score / "predictions.jsonl").read_text() == (bench / "predictions.jsonl").read_text()


def _vlmeval_predictions(path, predictions: dict[str, str]):
    """A VLMEvalKit predictions file as `infer_data_job` leaves it: the dataset TSV's rows with `image` dropped and a
    `prediction` column added, dumped as xlsx (the default PRED_FORMAT), tsv (quoted, as `dump_tsv`) or json (a list
    of row objects, as `dump_json`)."""
    import csv

    import pandas as pd

    src, _ = public_formats.vlmeval_tsv(path.parent / "data")
    table = pd.read_csv(src, sep="\t", dtype=str, keep_default_na=False).drop(columns=["image"])
    table["index"] = table["index"].astype(int)
    table["prediction"] = [predictions.get(str(i), "") for i in table["index"]]
    if path.suffix == ".xlsx":
        table.to_excel(path, index=False)
    elif path.suffix == ".tsv":
        table.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_ALL)
    else:
        path.write_text(json.dumps(table.to_dict("records"), indent=4))
    return src


@pytest.mark.parametrize("suffix", [".xlsx", ".tsv", ".json"])
def test_a_vlmeval_predictions_file_for_pathmmu_is_scored(suffix, tmp_path, capsys):
    # rows 0 and 1 of the TSV fixture (row 2 has a broken image and is skipped): gold A "H&E" of (H&E, PAS); gold C
    # "Mucin" of (Necrosis, Fibrosis, Mucin)
    preds = tmp_path / f"PathoR1_PathMMU_VAL{suffix}"
    src = _vlmeval_predictions(preds, {"0": "A", "1": "mucin", "2": "B"})
    out = tmp_path / "out"
    assert main(["eval", "score", "--name", "pathmmu", "--data", str(src), "--predictions", str(preds),
                 "--out", str(out), "--on-error", "skip"]) == 0
    report = json.loads((out / "results.json").read_text())["report"]
    # official: "mucin" is not the gold text "Mucin" (case counts) and has no letter: PathMMU's first random guess
    guess = random.Random(42).choice(list("ABC"))
    assert report["n"] == 2 and report["predictions_format"] == "vlmeval" and report["outside_selection"] == 1
    assert report["mcq"]["official"]["accuracy"] == round((1 + (guess == "C")) / 2, 4)
    assert report["mcq"]["corrected"]["accuracy"] == 1.0 and report["mcq"]["guessed"] == 1
    assert "[score] pathmmu (official)" in capsys.readouterr().out


def _mcq_set(tmp_path, n=3):
    rows = [{"id": f"q{i}", "question": "Which tissue?", "options": {"A": "stroma", "B": "necrosis"},
             "answer": "AB"[i % 2], "answer_type": "mcq"} for i in range(n)]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("lines, row, field, what", [
    ([{"id": "nope", "prediction": "A"}], 1, "id", "unknown id 'nope'"),
    ([{"id": "q0", "prediction": "A"}, {"id": "q0", "prediction": "B"}], 2, "id", "duplicate id 'q0'"),
    ([{"prediction": "A"}], 1, "id", "missing"),
    ([{"id": "q0", "answer": "A"}], 1, "prediction", "missing"),
    (["not json"], 1, None, "invalid JSON"),
])
def test_bad_predictions_are_one_line_naming_file_and_row(lines, row, field, what, tmp_path, capsys):
    data = _mcq_set(tmp_path)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(preds),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"error: {preds}:{row}: " + (f"field '{field}': " if field else "")) and what in err


def test_a_vlmeval_file_without_a_prediction_column_is_named(tmp_path, capsys):
    import pandas as pd

    data = _mcq_set(tmp_path)
    preds = tmp_path / "model_set.xlsx"
    pd.DataFrame({"index": ["q0"], "answer": ["A"]}).to_excel(preds, index=False)
    assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {preds}:1: field 'prediction': no `prediction` column") and "\n" not in err


def test_missing_predictions_are_counted_and_listed_not_scored(tmp_path, capsys):
    data = _mcq_set(tmp_path, n=3)
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": "q1", "prediction": "B"}) + "\n" + json.dumps({"id": "q2", "prediction": None})
                     + "\n")
    out = tmp_path / "out"
    assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(preds),
                 "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())["report"]
    assert report["n"] == 1 and report["missing"] == 2 and report["mcq"]["accuracy"] == 1.0
    assert [json.loads(x)["id"] for x in (out / "missing.jsonl").read_text().splitlines()] == ["q0", "q2"]
    assert "2 items have no prediction" in (out / "results.md").read_text()
    assert "2 items without a prediction" in capsys.readouterr().out
    preds.write_text(json.dumps({"id": "q2", "prediction": None}) + "\n")  # nothing to score at all: an error
    assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(preds)]) == 2
    assert "no prediction for any of the 3 benchmark rows" in capsys.readouterr().err


def test_per_class_accuracy_balanced_accuracy_and_confusion_by_hand():
    options = {"A": "necrosis", "B": "stroma", "C": "tumour"}
    golds = ["A"] * 4 + ["B"] * 2 + ["C"] * 2
    answers = ["A", "B", "B", "B", "B", "B", "C", "nothing I can read"]  # necrosis read as stroma 3 times of 4
    records = [MCQRecord(id=str(i), question="Which?", options=options, answer=g) for i, g in enumerate(golds)]
    report, _ = score_responses(get_benchmark("mcq"), records, [f"<answer>{a}</answer>" for a in answers])
    classes = report["classes"]
    assert {k: v["accuracy"] for k, v in classes["per_class"].items()} == {"necrosis": 0.25, "stroma": 1.0,
                                                                            "tumour": 0.5}
    assert classes["balanced_accuracy"] == round((0.25 + 1.0 + 0.5) / 3, 4)
    assert classes["confusion"]["columns"] == ["necrosis", "stroma", "tumour", "(none)"]
    assert classes["confusion"]["matrix"] == [[1, 3, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1]]
    assert report["mcq"]["accuracy"] == round(4 / 8, 4)  # the plain accuracy hides the necrosis collapse


def test_a_knowledge_set_gets_no_class_table():
    records = [MCQRecord(id=str(i), question="q", options={"A": f"text {i}", "B": f"other {i}"}, answer="A")
               for i in range(40)]
    report, _ = score_responses(get_benchmark("mcq"), records, ["A"] * 40)
    assert "classes" not in report  # 40 gold texts: options are free text, not classes


def test_subsets_of_our_own_sets_are_honoured_and_the_rest_counted_outside(tmp_path):
    rows = [{"id": f"q{i}", "question": "Which tissue?", "options": {"A": "stroma", "B": "necrosis"}, "answer": "A",
             "category": "ab"[i % 2]} for i in range(4)]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"id": f"q{i}", "prediction": "A"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(preds), "--subsets", "a",
                 "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())["report"]
    assert report["n"] == 2 and report["filtered"] == 2 and report["outside_selection"] == 2
    assert set(report["groups"]["category"]) == {"a"}
