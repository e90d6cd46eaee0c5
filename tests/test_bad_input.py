"""The first reliability battery's cases (issue 32): each bad input ends in one line naming the file, row and field,
with exit status 2 and no traceback, or is refused where it used to pass silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from patho_r1.data import load_records
from patho_r1.errors import DataError
from patho_r1.launch.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _completions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rewards, says", [
    ("format,nonexistent_reward", "--rewards: unknown reward 'nonexistent_reward'"),
    ("os:system", "--rewards: reward 'os:system' resolves to"),
])
def test_a_reward_that_is_not_one_is_one_line(tmp_path, capsys, rewards, says):
    rows = _completions(tmp_path / "c.jsonl", [{"completion": "<think>t</think><answer>A</answer>", "answer": "A"}])
    assert main(["rewards", "score", "--rewards", rewards, "--input", str(rows), "--output",
                 str(tmp_path / "out.jsonl")]) == 2
    assert says in _one_line_error(capsys)
    assert not (tmp_path / "out.jsonl").exists()


def test_completions_that_are_not_text_are_refused_and_blank_ones_are_counted(tmp_path, capsys):
    bad = _completions(tmp_path / "int.jsonl", [{"completion": "<answer>A</answer>", "answer": "A"},
                                                {"completion": 3, "answer": "A"}])
    assert main(["rewards", "score", "--rewards", "format", "--input", str(bad), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "int.jsonl:2: field 'completion': a completion is text, not a int" in _one_line_error(capsys)
    answered = {"completion": "<think>t</think><answer>A</answer>", "answer": "A"}
    blank = _completions(tmp_path / "blank.jsonl", [{"completion": "", "answer": "A"}, answered])
    assert main(["rewards", "score", "--rewards", "format", "--input", str(blank), "--output",
                 str(tmp_path / "o.jsonl")]) == 0
    assert "1 of 2 completions are empty (rows 1)" in capsys.readouterr().err


def test_an_unknown_answer_type_is_refused_not_scored_none(tmp_path, capsys):
    rows = _completions(tmp_path / "t.jsonl", [{"completion": "<think>t</think><answer>4</answer>", "answer": "4",
                                                "answer_type": "integer"}])
    assert main(["rewards", "score", "--rewards", "accuracy", "--input", str(rows), "--output",
                 str(tmp_path / "o.jsonl")]) == 2
    assert "t.jsonl:1: field 'answer_type': 'integer' is not one of mcq, yesno" in _one_line_error(capsys)


def test_a_recipe_with_a_non_utf8_byte_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes((ROOT / "recipes/demo.yaml").read_bytes().replace(b"name: demo", b"name: d\xe9mo"))
    assert main(["run", "--dry-run", str(recipe)]) == 2
    assert "r.yaml: line 3: byte 0xe9 is not UTF-8" in _one_line_error(capsys)


def test_an_output_root_that_climbs_out_is_refused(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "recipes/demo.yaml").read_text())
    raw["output_root"] = "../../elsewhere/run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["run", "--dry-run", str(recipe)]) == 2
    assert "output_root: '../../elsewhere/run' climbs out of the folder the run starts from" in capsys.readouterr().err


@pytest.fixture
def tile(tmp_path):
    from PIL import Image

    Image.new("RGB", (56, 56), (200, 120, 180)).save(tmp_path / "tile.png")
    return "tile.png"


def test_a_caption_of_megabytes_is_refused(tmp_path, tile):
    path = tmp_path / "cpt.jsonl"
    path.write_text(json.dumps({"caption": "ok", "images": [tile]}) + "\n"
                    + json.dumps({"caption": "word " * 200_000, "images": [tile]}) + "\n")
    with pytest.raises(DataError, match=r"cpt.jsonl:2: field 'caption': 1,000,000 characters, over the 100,000"):
        load_records(path, "caption")


def test_images_without_a_placeholder_in_the_conversation_are_refused(tmp_path, tile):
    path = tmp_path / "sft.jsonl"
    turns = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "Glands."}]
    path.write_text(json.dumps({"messages": turns, "images": [tile]}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'images': 1 image\(s\) given but no message holds an "
                                        "image placeholder"):
        load_records(path, "conversation")


def test_report_on_a_phase_file_cut_short_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "run_state.json").write_text(json.dumps({"phases": {"eval": {"type": "eval", "output_dir": "eval"}}}))
    (run / "eval" / "summary.json").write_text('{"rl": {"accuracy": 0.7, "n"')
    assert main(["report", str(run)]) == 2
    assert "summary.json:1: invalid JSON (Expecting" in _one_line_error(capsys)


def test_a_binary_predictions_file_is_one_line(tmp_path, world_dir, capsys):
    data = world_dir / "eval/PathoSynth_MCQ.tsv"
    bodies = {"bin.jsonl": b"\x00\xff\xfe garbage", "latin.jsonl": b'{"id": "a", "prediction": "caf\xe9"}\n',
              "vlm.json": b'[{"index": 1, "prediction": "\xff"}]'}
    for name, body in bodies.items():
        (tmp_path / name).write_bytes(body)
        assert main(["eval", "score", "--name", "mcq", "--data", str(data), "--predictions", str(tmp_path / name),
                     "--out", str(tmp_path / "out")]) == 2
        assert f"{name}" in (line := _one_line_error(capsys)) and "not UTF-8: byte 0x" in line


def test_outputs_that_are_the_wrong_kind_of_path_are_one_line(tmp_path, world_dir, capsys):
    rows = _completions(tmp_path / "c.jsonl", [{"completion": "<think>t</think><answer>A</answer>", "answer": "A"}])
    assert main(["rewards", "score", "--rewards", "format", "--input", str(rows), "--output", str(tmp_path)]) == 2
    assert "is a folder; give the path of the file to write" in _one_line_error(capsys)
    (tmp_path / "afile").write_text("keep me")
    predictions = _completions(tmp_path / "p.jsonl", [{"id": "x", "prediction": "A"}])
    assert main(["eval", "score", "--name", "mcq", "--data", str(world_dir / "eval/PathoSynth_MCQ.tsv"),
                 "--predictions", str(predictions), "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert "afile: exists and is not a folder" in _one_line_error(capsys)
    assert (tmp_path / "afile").read_text() == "keep me"


def test_invalid_yaml_is_one_line_with_its_position(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nphases: [\n")
    assert main(["plan", str(recipe)]) == 2
    assert "r.yaml: invalid YAML: line 3, column 1: expected the node content" in _one_line_error(capsys)
