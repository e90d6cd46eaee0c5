"""The data engine's stage table: it agrees with the config union, names what it does not know, builds the command
line, and a new stage is one registration plus its module."""

from __future__ import annotations

import argparse
import ast
import json
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest

from patho_r1.config import StrictModel
from patho_r1.curate.config import DedupStage, ImportStage, Stage
from patho_r1.curate.pipeline import run_stage
from patho_r1.curate.stages import STAGES, StageContext, StageType, get_stage, register_stage
from patho_r1.curate.store import iter_jsonl, relative_images, stage_files
from patho_r1.errors import ConfigError
from patho_r1.fixtures import public_formats

ROOT = Path(__file__).resolve().parent.parent


def test_the_table_and_the_config_union_name_the_same_stages():
    members = typing.get_args(typing.get_args(Stage)[0])
    assert [m.model_fields["stage"].default for m in members] == list(STAGES)
    for name, stage in STAGES.items():
        cls = stage.config_class()
        assert cls in members and cls.model_fields["stage"].default == name
        assert set(stage.inputs) <= set(cls.model_fields), name


def test_an_unknown_stage_is_named_with_the_known_ones_and_a_name_is_registered_once():
    with pytest.raises(KeyError, match="unknown curate stage 'sampel'; known: import, dedup, decontaminate"):
        get_stage("sampel")
    with pytest.raises(ValueError, match="already registered"):
        register_stage(STAGES["dedup"])


def test_inputs_and_appending_are_read_from_the_table(tmp_path):
    from patho_r1.curate.config import MCQStage

    (tmp_path / "a.csv").write_text("x")
    src = ImportStage(sources=[{"format": "csv", "path": str(tmp_path / "a.csv"), "kind": "caption",
                                "images": str(tmp_path)}])
    assert get_stage("import").input_paths(src) == [str(tmp_path / "a.csv"), str(tmp_path)]
    endpoint = {"base_url": "http://localhost:1/v1", "model": "m"}
    assert get_stage("mcq").appends_in_place(MCQStage(source="teacher", endpoint=endpoint))
    assert not get_stage("mcq").appends_in_place(MCQStage())
    assert get_stage("generate").appends_in_place(None) and not get_stage("dedup").appends_in_place(None)


def _parser():
    from patho_r1.curate import cli

    parser = argparse.ArgumentParser(prog="patho-r1")
    cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_every_stage_has_its_subcommand_with_the_common_flags():
    parser = _parser()
    for name, stage in STAGES.items():
        argv = ["curate", name] + (["parent"] if stage.parent == "required" else [])
        argv += {"import": ["src", "--format", "csv"], "decontaminate": ["--against", "b.tsv"],
                 "generate": ["--base-url", "u", "--model", "m"]}.get(name, [])
        args = parser.parse_args([*argv, "--out", "o", "--seed", "3", "--force"])
        assert (args.out, args.seed, args.force, args.overwrite) == ("o", 3, True, False)
    filt = parser.parse_args(["curate", "filter", "--input", "g.jsonl", "--out", "o"])
    assert filt.input is None and filt.input_file == "g.jsonl"  # the parent folder is optional
    assert parser.parse_args(["curate", "prompts", "--list"]).list


@pytest.fixture
def imported(tmp_path):
    src, _ = public_formats.arch(tmp_path / "src")
    stage = ImportStage(sources=[{"format": "arch", "path": str(src)}], on_error="skip")
    run_stage(stage, None, tmp_path / "01-import")
    return tmp_path / "01-import"


class SampleStage(StrictModel):
    stage: Literal["sample"] = "sample"
    every: int = 2


def run_sample(stage: SampleStage, ctx: StageContext) -> dict:
    kept = 0
    for kind, file in stage_files(ctx.parent).items():
        for i, row in enumerate(iter_jsonl(file)):
            if i % stage.every == 0:
                ctx.writer.row(kind, relative_images(row, ctx.parent, ctx.final))
                kept += 1
            ctx.progress.advance(1)
    return {"kept": kept}


def sample_arguments(q):
    q.add_argument("--every", type=int, default=2, help="keep one row in N")
    return lambda a: {"every": a.every}


def test_a_new_stage_is_one_registration_and_its_module(imported, tmp_path, monkeypatch):
    here = sys.modules[__name__].__name__
    monkeypatch.setitem(STAGES, "sample", StageType(
        "sample", f"{here}:SampleStage", f"{here}:run_sample", help="every Nth row",
        arguments=f"{here}:sample_arguments"))
    manifest = run_stage(SampleStage(every=3), imported, tmp_path / "02-sample")
    assert manifest.stage == "sample" and manifest.counts["kept"] == 4 and manifest.counts["kinds"] == {"caption": 4}
    rows = list(iter_jsonl(tmp_path / "02-sample/caption.jsonl"))
    assert all((tmp_path / "02-sample" / r["images"][0]).is_file() for r in rows)  # re-based on the new folder
    assert run_stage(SampleStage(every=3), imported, tmp_path / "02-sample").created == manifest.created  # resumed
    args = _parser().parse_args(["curate", "sample", str(imported), "--every", "5", "--out", "o"])
    assert args.input == str(imported) and args.every == 5


def test_a_dry_run_is_refused_by_a_stage_that_cannot_estimate(imported, tmp_path):
    with pytest.raises(ConfigError, match="curate dedup: no dry run .only generate"):
        run_stage(DedupStage(), imported, tmp_path / "d", dry_run=True)
    assert not (tmp_path / "d").exists()


def test_the_manifest_of_a_stage_run_through_the_table(imported, tmp_path):
    manifest = json.loads((imported / "manifest.json").read_text())
    assert manifest["stage"] == "import" and list(manifest["counts"])[:3] == ["kinds", "engine", "rows_per_s"]
    assert manifest["counts"]["sources"]["arch"]["caption"] == 10
    assert list(manifest["inputs"]) == [str(Path(manifest["config"]["sources"][0]["path"]).resolve())]


def test_no_function_in_the_data_engine_is_longer_than_40_lines():
    long = []
    for path in sorted((ROOT / "curate").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 40:
                long.append(f"curate/{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
