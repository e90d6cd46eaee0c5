"""The phase table holds every per-phase fact: the record kind each phase reads (checked at `run --dry-run` on the
first rows of each data file), its memory-plan hook, its report line, and the standalone `patho-r1 phase` command."""

from pathlib import Path

import pytest
import yaml

from patho_r1.config import PhaseConfig, PhaseResult
from patho_r1.errors import ConfigError
from patho_r1.launch.cli import main
from patho_r1.launch.phases import KIND_SOURCES, PHASES, PhaseType, register_phase
from patho_r1.launch.planner import check_data_kinds, kind_problem, plan_recipe
from patho_r1.launch.recipe import build_plan

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_gpu_here(monkeypatch):
    from patho_r1.launch import preflight

    monkeypatch.setattr(preflight, "gpu_here", lambda: False)


def _mcq_file(world_dir: Path, path: Path) -> Path:
    """What importing PathVQA writes: a stage folder's mcq.jsonl (here the world's RL MCQs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((world_dir / "rl/train.jsonl").read_text().splitlines(keepends=True)[:8]))
    return path


def _recipe(tmp_path: Path, world_dir: Path, phases: list[dict]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_root": str(tmp_path / "out"), "model": {"base": "tiny"},
                                    "data": {"root": str(world_dir)}, "phases": phases}))
    return path


def test_an_mcq_file_given_to_sft_fails_at_dry_run_in_one_line(world_dir, tmp_path, capsys):
    mcq = _mcq_file(world_dir, tmp_path / "pathvqa/mcq.jsonl")
    recipe = _recipe(tmp_path, world_dir, [
        {"name": "cpt", "type": "cpt", "config": {"data": "{data}/cpt/train.jsonl"}},
        {"name": "sft", "type": "sft", "config": {"data": str(mcq)}}])
    assert main(["run", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err
    print(err)
    assert err.count("\n") == 1, err  # one line
    assert err.startswith(f"error: {recipe}: phases[1] (sft).config.data: {mcq} holds mcq rows, but the sft phase "
                          "reads conversation rows; `patho-r1 curate generate` then `patho-r1 curate filter`")
    assert main(["plan", str(recipe)]) == 2  # the planner refuses it too
    assert "holds mcq rows" in capsys.readouterr().err


def test_every_phase_of_the_demo_reads_the_kind_its_files_hold(world_dir, tmp_path):
    raw = yaml.safe_load((ROOT / "recipes/demo.yaml").read_text())
    raw.update(output_root=str(tmp_path / "out"), data={"root": str(world_dir)})
    plan = build_plan(raw)
    check_data_kinds(plan)  # no false alarm on cpt, sft, rl, embed (pairs, MCQs), clip (captions, MCQs), eval (TSV)
    checked = {(p.type, name) for p in plan.phases for name in p.config.input_paths()
               if PHASES[p.type].kind_of(name) and Path(p.config.input_paths()[name]).exists()}
    assert {("cpt", "data"), ("sft", "data"), ("rl", "data"), ("embed", "stage2.curriculum.0.data"),
            ("clip", "stage1.data.0"), ("clip", "eval.classification"), ("eval", "data")} <= checked
    raw["phases"][3]["config"]["eval"]["composed"] = "{data}/cpt/train.jsonl"  # captions where pairs belong
    with pytest.raises(ConfigError, match=r"eval.composed: .*train.jsonl holds caption rows, but the embed phase "
                       r"reads embed_pair rows"):
        check_data_kinds(build_plan(raw))


def test_a_file_made_by_an_earlier_phase_of_the_run_is_left_to_that_phase(world_dir, tmp_path):
    """What is in an earlier phase's folder now is an older run's: the phase that makes it runs first."""
    _mcq_file(world_dir, tmp_path / "out/score/old.jsonl")
    raw = yaml.safe_load(_recipe(tmp_path, world_dir, [
        {"name": "score", "type": "eval", "config": {"data": "{data}/eval/PathoSynth_MCQ.tsv",
                                                     "checkpoints": ["base"]}},
        {"name": "sft", "type": "sft", "config": {"data": "{output}/score/old.jsonl"}}]).read_text())
    plan = build_plan(raw)
    check_data_kinds(plan)
    with pytest.raises(ConfigError, match="holds mcq rows"):  # only sft runs: the file is there to be read
        check_data_kinds(plan, [plan.phase("sft")])


def test_a_curate_stage_folder_is_read_by_its_manifest(world_dir, tmp_path):
    from patho_r1.curate.store import MANIFEST, StageManifest

    stage = tmp_path / "07-filter"
    _mcq_file(world_dir, stage / "mcq.jsonl")
    manifest = StageManifest(stage="mcq", config_hash="x", counts={"kinds": {"mcq": 8}}, files={"mcq.jsonl": "y"})
    (stage / MANIFEST).write_text(manifest.model_dump_json())
    problem = kind_problem(stage, "conversation", "sft")
    assert problem.startswith(f"{stage} is a curate stage folder of mcq rows, but the sft phase reads conversation")
    assert kind_problem(stage, "mcq", "rl") == f"{stage} is a curate stage folder; give its file {stage}/mcq.jsonl " \
        "(its mcq rows)"
    assert set(KIND_SOURCES) >= {"caption", "conversation", "mcq", "embed_pair"}


def test_rows_of_no_kind_get_the_loaders_own_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"mesages": [], "images": []}\n')
    assert kind_problem(bad, "conversation", "sft").startswith(f"{bad}")
    assert "mesages" in kind_problem(bad, "conversation", "sft")


def test_the_standalone_phase_command_checks_the_config_and_its_data(world_dir, tmp_path, capsys):
    cfg = {"model": "Qwen/Qwen2.5-VL-3B-Instruct", "data": str(world_dir / "sft/train.jsonl"),
           "output_dir": str(tmp_path / "sft"), "max_steps": 2}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["phase", "sft", str(tmp_path / "sft.yaml"), "--dry-run"]) == 0
    assert "--dry-run: nothing run" in capsys.readouterr().out
    assert main(["sft", str(tmp_path / "sft.yaml"), "--dry-run", "--resume"]) == 0  # the alias, same command
    capsys.readouterr()
    cfg["data"] = str(_mcq_file(world_dir, tmp_path / "mcq.jsonl"))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["phase", "sft", str(tmp_path / "sft.yaml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"data: {tmp_path / 'mcq.jsonl'} holds mcq rows" in err


class ToyConfig(PhaseConfig):
    data: str

    def input_paths(self) -> dict[str, str]:
        return {"data": self.data}


def run_toy(cfg: ToyConfig) -> PhaseResult:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "n.txt").write_text(str(len((Path(cfg.data)).read_text().splitlines())))
    return PhaseResult(model_dir=out, metrics={"rows": 1})


def toy_result(out: Path, metrics: dict) -> str:
    return f"rows={(out / 'n.txt').read_text()}"


@pytest.fixture
def toy_phase():
    phase = register_phase(PhaseType("toy", f"{__name__}:ToyConfig", f"{__name__}:run_toy", ray_train=False,
                                     uses_model=False, reads={"data": "caption"}, not_planned="a toy",
                                     result=f"{__name__}:toy_result", summary="count caption rows"))
    yield phase
    PHASES.pop("toy")


def test_a_new_phase_brings_its_data_kind_plan_note_report_line_and_command(toy_phase, world_dir, tmp_path, capsys):
    from patho_r1.launch.report import phase_headline

    recipe = _recipe(tmp_path, world_dir, [{"name": "count", "type": "toy",
                                            "config": {"data": "{data}/rl/train.jsonl"}}])
    assert main(["run", str(recipe), "--dry-run"]) == 2
    assert "holds mcq rows, but the toy phase reads caption rows; `patho-r1 curate import`" in capsys.readouterr().err
    raw = yaml.safe_load(recipe.read_text())
    raw["phases"][0]["config"]["data"] = "{data}/cpt/train.jsonl"
    memory = plan_recipe(build_plan(raw))
    assert memory.phases[0].setup is None and memory.phases[0].notes == ["a toy"]
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({"data": str(world_dir / "cpt/train.jsonl"),
                                                       "output_dir": str(tmp_path / "toy")}))
    assert main(["phase", "toy", str(tmp_path / "toy.yaml")]) == 0
    out = capsys.readouterr().out
    n = len((world_dir / "cpt/train.jsonl").read_text().splitlines())
    assert f"toy: output in {tmp_path / 'toy'}" in out and f"toy: rows={n}" in out
    assert phase_headline(tmp_path / "toy", {"train_loss": 0.5}, "toy") == f"train_loss=0.5  rows={n}"
