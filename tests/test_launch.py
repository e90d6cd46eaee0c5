"""Recipes: every shipped recipe validates, GPU recipes dry-run, bad recipes list every problem, and a failed phase is
retried then reported.  (A killed run's resume is tests/test_liveness.py's kill-anywhere test.)"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from patho_r1.errors import ConfigError
from patho_r1.launch.cli import main
from patho_r1.launch.recipe import build_plan, load_plan

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates_and_dry_runs(recipe, capsys, monkeypatch):
    from patho_r1.launch import preflight

    # as from a machine without a GPU, whatever this one has: GPU phases' packages are checked where they run
    # (tests/test_gpu_stack.py checks them on a simulated GPU machine)
    monkeypatch.setattr(preflight, "gpu_here", lambda: False)
    plan = load_plan(recipe)
    assert plan.phases and all(p.config is not None for p in plan.phases)
    assert main(["run", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for p in plan.phases:
        assert f"{p.name} [{p.type}]" in out
    assert "resources:" in out and "runtime stack:" in out


def test_gpu_recipes_ask_for_gpus_vllm_and_deepspeed():
    for name in ("patho-r1-3b.yaml", "patho-r1-7b.yaml"):
        plan = load_plan(ROOT / "recipes" / name)
        rl = plan.phase("rl")
        assert rl.resources.use_gpu and rl.config.rollout.engine == "vllm"
        assert plan.phase("sft").config.deepspeed.endswith(".json")
        # no flash-attn needed: auto runs it where installed, SDPA and our vision kernel otherwise
        assert all(plan.phase(p).config.attn_implementation == "auto" for p in ("cpt", "sft", "rl"))
        assert plan.phase("sft").config.model == str(plan.phase("cpt").final_dir)
        assert rl.config.model == str(plan.phase("sft").final_dir)
    assert load_plan(ROOT / "recipes/patho-r1-3b.yaml").phase("rl").config.algorithm == "dapo"


def _recipe(tmp_path, phases, **extra):
    return {"name": "t", "output_root": str(tmp_path / "out"), "model": {"base": "tiny"},
            "data": {"synth": {"seed": 0}}, "phases": phases, **extra}


def test_bad_recipe_reports_every_problem_at_once(tmp_path):
    raw = _recipe(tmp_path, [
        {"name": "sft", "type": "sft", "config": {"data": "{data}/sft/train.jsonl", "learning_rate": -1}},
        {"name": "rl", "type": "rl", "config": {"data": "{data}/rl/train.jsonl", "algorithm": "ppo",
                                                "typo_field": 1}},
        {"name": "eval", "type": "eval", "config": {"data": "{data}/x.tsv", "checkpoints": ["sft", "nope"]}},
        {"name": "bad", "type": "sft", "config": {"data": "{phase:later}/x.jsonl"}},
    ])
    with pytest.raises(ConfigError) as info:
        build_plan(raw)
    text = str(info.value)
    for needle in ("phases[0] (sft).config.learning_rate", "phases[1] (rl).config.algorithm",
                   "phases[1] (rl).config.typo_field", "'nope' is not 'base' or an earlier phase",
                   "unknown reference {phase:later}"):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="data: give exactly one"):
        build_plan({**raw, "data": {}})


def test_phase_inputs_default_to_the_previous_phase(tmp_path):
    plan = build_plan(_recipe(tmp_path, [
        {"name": "a", "type": "cpt", "config": {"data": "{data}/cpt/train.jsonl"}},
        {"name": "b", "type": "sft", "config": {"data": "{data}/sft/train.jsonl"}},
        {"name": "c", "type": "sft", "config": {"data": "{data}/sft/train.jsonl", "model": "{phase:a}"}},
    ], defaults={"learning_rate": 3e-4}))
    a, b, c = plan.phases
    assert a.config.model == str(tmp_path / "out/base-model")
    assert b.config.model == str(a.final_dir) and c.config.model == str(a.final_dir)
    assert b.config.learning_rate == 3e-4 and b.config.recipe_hash == plan.recipe_hash
    assert b.config.parent == b.config.model


def test_relative_phase_inputs_are_read_from_where_the_run_started(tmp_path, monkeypatch):
    # A Ray worker runs in its own working directory, so a phase's relative `data:` would name nothing there (the
    # grounding demo's RL rows failed so: "rl.data: not found").  Relative input paths are made absolute at planning,
    # against the directory the runner starts from, nested ones (a detection prior, an embed curriculum) too.
    monkeypatch.chdir(tmp_path)
    plan = build_plan(_recipe(tmp_path, [
        {"name": "rl", "type": "rl", "config": {"data": "rows/rl.jsonl", "algorithm": "dapo"}},
        {"name": "det", "type": "detection", "config": {"data": "/abs/heldout.jsonl", "checkpoints": ["rl"],
                                                        "prior_from": "rows/train.jsonl"}},
        {"name": "emb", "type": "embed", "config": {"stage1": {"curriculum": [{"data": "pairs/a.jsonl"}]}}},
    ], defaults={"per_device_train_batch_size": 8}))
    rl, det, emb = (p.config for p in plan.phases)
    assert rl.data == str(tmp_path / "rows/rl.jsonl")
    assert det.prior_from == str(tmp_path / "rows/train.jsonl") and det.data == "/abs/heldout.jsonl"
    assert emb.stage1.curriculum[0].data == str(tmp_path / "pairs/a.jsonl")
    assert rl.rewards == build_plan(_recipe(tmp_path, [
        {"name": "rl", "type": "rl", "config": {"data": "{data}/rl/train.jsonl", "algorithm": "dapo"}}
    ], defaults={"per_device_train_batch_size": 8})).phases[0].config.rewards  # nothing but the paths changed


def test_unknown_phase_selection_is_an_error(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, [{"name": "a", "type": "cpt",
                                                       "config": {"data": "{data}/cpt/train.jsonl"}}])))
    assert main(["run", str(path), "--phases", "zzz"]) == 2
    assert "unknown phase(s) ['zzz']" in capsys.readouterr().err


def _run(args, log):
    return subprocess.Popen([sys.executable, "-m", "patho_r1.launch.cli", "run", *args], stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=ROOT,
                            env={**os.environ, "WANDB_MODE": "disabled", "WANDB_API_KEY": FAKE_KEY})


FAKE_KEY = "fake-wandb-key-never-logged-0123"


def training_recipe(root, phases, **defaults):
    """A small-world recipe for the kill-and-resume tests, written to `root/recipe.yaml`: one CPU, no retries,
    wandb off, a logged row per step."""
    common = {"max_length": 512, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
              "warmup_ratio": 0.0, **defaults}
    raw = _recipe(root, phases, defaults=common, wandb={"mode": "disabled"},
                  resources={"cpus_per_worker": 1, "max_failures": 0})
    raw["data"]["synth"].update(n_train_tiles=48, n_heldout_tiles=12, n_sft=40, n_rl=8, n_rl_heldout=6,
                                n_embed_pairs=8, n_composed_per_task=2, n_eval_tiles=6, n_eval_mcq=3)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


PHASE_CONFIGS = sorted((ROOT / "recipes/phases").glob("*.yaml"))


@pytest.mark.parametrize("path", PHASE_CONFIGS, ids=[p.name for p in PHASE_CONFIGS])
def test_standalone_phase_configs_validate(path):
    from patho_r1.config import read_yaml, validate_config
    from patho_r1.launch.phases import get_phase

    cfg = validate_config(get_phase(path.stem).config_class(), read_yaml(path), defer_path_checks=True)
    assert cfg.output_dir.startswith("runs/phases/")


def test_report_tables():
    from patho_r1.launch.report import render_markdown

    report = {"recipe": "r", "recipe_hash": "h",
              "mcq": {"sft": {"n": 60, "accuracy": 0.5, "strict_accuracy": 0.4, "format_rate": 1.0, "chance": 0.2,
                              "ci95": [0.3, 0.7], "wrong_image_accuracy": 0.25}},
              "paired": [{"from": "cpt", "to": "sft", "gained": 30, "lost": 2, "p_value": 1.2e-7}],
              "retrieval": {"embed": {"tasks": {"it2t": {"recall@1": 0.3, "recall@5": 0.8, "chance@1": 0.05,
                                                         "simple_add_recall@1": 0.1}}}},
              "wall_time_s": {"sft": 12.0}}
    text = render_markdown(report)
    assert "| sft | 60 | 0.500 | 0.30-0.70 | 0.250 | 0.400 | 1.000 | 0.200 |" in text
    assert "| cpt | sft | 30 | 2 | 1.2e-07 |" in text
    assert "| it2t | 0.300 | 0.800 | 0.050 | 6.0x | 0.100 |" in text
    assert "| sft | 12.0 |" in text


def test_prepare_builds_inputs_once_and_rebuilds_when_settings_change(tmp_path):
    import json

    from patho_r1.launch.runner import prepare_inputs

    phases = [{"name": "a", "type": "cpt", "config": {"data": "{data}/cpt/train.jsonl"}}]
    raw = _recipe(tmp_path, phases)
    raw["data"]["synth"].update(n_train_tiles=12, n_heldout_tiles=6, n_sft=4, n_rl=4, n_rl_heldout=3,
                                n_embed_pairs=4, n_composed_per_task=1, n_eval_tiles=6, n_eval_mcq=3)
    prepare_inputs(build_plan(raw))
    out = tmp_path / "out"
    stamp = (out / "base-model/model.safetensors").stat().st_mtime_ns
    prepare_inputs(build_plan(raw))  # nothing changed: nothing rebuilt
    assert (out / "base-model/model.safetensors").stat().st_mtime_ns == stamp
    raw["model"]["tiny"] = {"num_hidden_layers": 1}
    raw["data"]["synth"]["seed"] = 5
    prepare_inputs(build_plan(raw))
    assert json.loads((out / "base-model/tiny_spec.json").read_text())["num_hidden_layers"] == 1
    assert json.loads((out / "world/world.json").read_text())["seed"] == 5
    kept = sorted(p.name.split(".prev-")[0] for p in out.iterdir() if ".prev-" in p.name)
    assert kept == ["base-model", "world"]  # the previous inputs are kept, not deleted


@pytest.mark.slow
def test_failed_phase_is_retried_then_reported_with_its_cause(tmp_path, monkeypatch):
    """Phase inputs are re-checked inside the Ray worker; a missing file fails every attempt of the phase and the
    runner reports the phase, the attempts and the root cause in one error."""
    import json

    from patho_r1.launch.runner import PhaseFailed, run_recipe

    monkeypatch.chdir(tmp_path)
    raw = _recipe(tmp_path, [{"name": "sft", "type": "sft",
                              "config": {"data": "{output}/missing.jsonl", "max_steps": 1}}],
                  wandb={"mode": "disabled"}, resources={"cpus_per_worker": 1, "max_failures": 1})
    raw["data"]["synth"].update(n_train_tiles=12, n_heldout_tiles=6, n_sft=4, n_rl=4, n_rl_heldout=3,
                                n_embed_pairs=4, n_composed_per_task=1, n_eval_tiles=6, n_eval_mcq=3)
    plan = build_plan(raw)
    try:
        with pytest.raises(PhaseFailed) as info:
            run_recipe(plan)
    finally:
        import ray

        ray.shutdown()
    text = str(info.value)
    assert "phase 'sft' (sft) failed after 2 attempt(s)" in text and "missing.jsonl" in text
    assert f"full log: {tmp_path / 'out/logs/sft.rank*.log'}" in text
    worker_log = (tmp_path / "out/logs/sft.rank0.log").read_text()
    assert "Traceback" in worker_log and "missing.jsonl" in worker_log  # both attempts, in full
    state = json.loads((tmp_path / "out/run_state.json").read_text())
    assert state["phases"]["sft"]["status"] == "failed"


def test_impossible_numbers_fail_at_recipe_validation(tmp_path):
    raw = _recipe(tmp_path, [{"name": "sft", "type": "sft", "config": {"data": "{data}/sft/train.jsonl",
                                                                       "max_steps": 0}}], seed=-1)
    raw["model"]["tiny"] = {"hidden_size": 96, "num_attention_heads": 4}
    raw["data"]["synth"]["n_sft"] = -5
    with pytest.raises(ConfigError) as info:
        build_plan(raw)
    text = str(info.value)
    for needle in ("seed: Input should be greater than or equal to 0", "head_dim = hidden_size / num_attention_heads",
                   "counts must be >= 0 (n_sft", ):
        assert needle in text, (needle, text)
    raw.update(seed=0)
    raw["model"]["tiny"] = {}
    raw["data"]["synth"]["n_sft"] = 5
    with pytest.raises(ConfigError, match=r"max_steps: 0 trains nothing"):
        build_plan(raw)


def test_a_fresh_run_never_resumes_a_stale_checkpoint(tmp_path):
    import time as clock

    from patho_r1.launch.workers import should_resume

    stale = tmp_path / "sft/checkpoints/checkpoint-5"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")
    config = {"output_dir": str(tmp_path / "sft")}
    started = clock.time() + 1.0  # the checkpoint predates this run
    assert should_resume(config, asked=False, started=started) is False
    assert should_resume(config, asked=True, started=started) is True  # --resume
    assert should_resume(config, asked=False, started=0.0) is True  # written by this run: Ray restarted the workers
    assert should_resume({"output_dir": str(tmp_path / "none")}, asked=False, started=0.0) is False


def test_two_runs_cannot_share_an_output_folder(tmp_path):
    from filelock import FileLock

    from patho_r1.launch.runner import run_recipe

    plan = build_plan(_recipe(tmp_path, [{"name": "a", "type": "cpt", "config": {"data": "{data}/cpt/train.jsonl"}}]))
    Path(plan.recipe.output_root).mkdir(parents=True)
    with FileLock(Path(plan.recipe.output_root) / ".patho-r1.lock"):
        with pytest.raises(ConfigError, match="another patho-r1 run is using this output folder"):
            run_recipe(plan)


def test_a_phase_that_never_checkpoints_is_warned_about(tmp_path, capsys):
    plan = build_plan(_recipe(tmp_path, [{"name": "rl", "type": "rl",
                                          "config": {"data": "{data}/rl/train.jsonl", "max_steps": 40,
                                                     "per_device_train_batch_size": 8,
                                                     "save_steps": 100}}]))
    assert len(plan.warnings) == 1 and "max_steps 40 < save_steps 100" in plan.warnings[0]
    assert "warning: phases[0] (rl)" in plan.describe()
