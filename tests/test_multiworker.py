"""Two Ray Train workers over gloo compute what one worker holding the global batch computes.

* SFT: 2 workers x batch b give the loss curve and the weights of 1 worker x 2b (float tolerance), and a 2-worker
  run resumed from an intermediate checkpoint ends with the weights of an uninterrupted one.
* RL: GRPO groups never straddle ranks, and DAPO's dynamic sampling makes the same refill decisions and logs the same
  `dynamic_sampling/*` metrics as one worker with the same seed and global batch (the reward here depends on the
  prompt only, so the decisions are deterministic).

(The embedding head's cross-rank negatives are checked in tests/test_embed.py, on two gloo ranks.)
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from in_process import run_recipe_in_this_process
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(root: Path, phase: dict, workers: int, *args, env=None) -> Path:
    """Run a one-phase recipe on the tiny model and a small world with `workers` Ray Train workers (1 CPU each)."""
    raw = {"name": "mw", "output_root": str(root / "out"), "model": {"base": "tiny"}, "seed": 0,
           "data": {"synth": {"seed": 0, "n_train_tiles": 48, "n_heldout_tiles": 12, "n_sft": 40, "n_rl": 16,
                              "n_rl_heldout": 6, "n_embed_pairs": 8, "n_composed_per_task": 2, "n_eval_tiles": 6,
                              "n_eval_mcq": 3}},
           "resources": {"num_workers": workers, "cpus_per_worker": 1, "max_failures": 0},
           "wandb": {"mode": "disabled"},
           "defaults": {"max_length": 512, "learning_rate": 1e-3, "logging_steps": 1, "warmup_ratio": 0.0,
                        "lr_scheduler_type": "constant"},
           "phases": [phase]}
    root.mkdir(parents=True, exist_ok=True)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = root / f"run-{workers}.log"
    with open(log, "a") as f:
        proc = subprocess.run([sys.executable, "-m", "patho_r1.launch.cli", "run", str(path), *args], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT, timeout=600,
                              env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT / "tests"),
                                   **(env or {})})
    assert proc.returncode == 0, log.read_text()[-4000:]
    return root / "out"


def _in_this_process(root: Path, phase: dict, inputs: Path) -> Path:
    """The same one-phase recipe, run by one worker in this process (no Ray): the single worker that holds the global
    batch, reading the base model and the world the Ray run prepared under `inputs`."""
    return run_recipe_in_this_process(inputs.parent / "recipe.yaml", root, inputs, phases=[phase])


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_sft_two_workers_match_one_worker_with_the_global_batch_and_resume(tmp_path):
    sft = {"name": "sft", "type": "sft", "config": {"data": "{data}/sft/train.jsonl", "max_steps": 6,
                                                     "save_steps": 2, "save_total_limit": 5}}
    two = _run(tmp_path / "two", {**sft, "config": {**sft["config"], "per_device_train_batch_size": 2}}, 2)
    one = _in_this_process(tmp_path / "one", {**sft, "config": {**sft["config"], "per_device_train_batch_size": 4}},
                           two)
    loss_one = [r["loss"] for r in _steps(one / "sft/metrics.jsonl") if "loss" in r]
    loss_two = [r["loss"] for r in _steps(two / "sft/metrics.jsonl") if "loss" in r]
    assert len(loss_one) == len(loss_two) == 6
    assert loss_one[-1] < loss_one[0]  # it learns
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    w1, w2 = _weights(one / "sft/model"), _weights(two / "sft/model")
    base = _weights(two / "base-model")
    moved = max(float((w1[k].float() - base[k].float()).abs().max()) for k in w1)
    worst = max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)
    # Measured: 1.3e-5 against a movement of 6.0e-3 (float noise that Adam's normalisation amplifies where a gradient
    # is near zero).  When each micro-batch's token mean was the loss, they differed by 8.6e-3: more than they moved.
    assert worst < 0.01 * moved, (worst, moved)

    # Resume with 2 workers: drop the final model and the last checkpoint, as a kill after step 4 would.
    shutil.copytree(two / "sft/model", tmp_path / "uninterrupted")
    shutil.rmtree(two / "sft/model")
    shutil.rmtree(two / "sft/checkpoints/checkpoint-6")
    _run(tmp_path / "two", {**sft, "config": {**sft["config"], "per_device_train_batch_size": 2}}, 2, "--resume")
    resumed, reference = _weights(two / "sft/model"), _weights(tmp_path / "uninterrupted")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_rl_dynamic_sampling_on_two_workers_decides_what_one_worker_decides(tmp_path, monkeypatch):
    rl = {"name": "rl", "type": "rl", "config": {
        "data": "{data}/rl/train.jsonl", "algorithm": "dapo", "num_generations": 4, "max_completion_length": 8,
        "max_steps": 3, "save_steps": 100, "rewards": [{"name": "reward_plugins:by_prompt"}],
        "dynamic_sampling": {"enabled": True, "max_rounds": 2, "filter_metric": "total"}}}
    runs = {}
    # a global generation batch of 8 rows = 2 groups of 4: two Ray workers of 4, then one worker of 8 in this process
    for workers, batch in ((2, 4), (1, 8)):
        root = tmp_path / f"w{workers}"
        log = root / "rewards.jsonl"
        config = {**rl, "config": {**rl["config"], "per_device_train_batch_size": batch}}
        if workers == 2:
            out = _run(root, config, workers, env={"PATHO_TEST_REWARD_LOG": str(log)})
        else:
            monkeypatch.setenv("PATHO_TEST_REWARD_LOG", str(log))
            out = _in_this_process(root, config, tmp_path / "w2" / "out")
        steps = [s for s in _steps(out / "rl/metrics.jsonl") if "dynamic_sampling/rounds" in s]  # not the summary
        runs[workers] = (steps, _steps(log))
    (steps1, calls1), (steps2, calls2) = runs[1], runs[2]
    keys = ("dynamic_sampling/filtered_frac", "dynamic_sampling/rounds", "dynamic_sampling/cap_hit",
            "dynamic_sampling/extra_groups")
    assert len(steps1) == len(steps2) == 3
    assert [[s[k] for k in keys] for s in steps2] == [[s[k] for k in keys] for s in steps1]
    assert any(s["dynamic_sampling/rounds"] > 1 for s in steps1)  # some steps did refill
    for call in calls2:  # each rank's rows are whole groups: 4 rows of one prompt, never split across ranks
        p = call["prompts"]
        assert len(p) % 4 == 0 and all(len(set(p[i:i + 4])) == 1 for i in range(0, len(p), 4))
    # The same prompts were scored, round by round: rank 0's and rank 1's together are the single worker's.  In a
    # round where one rank was already full, that rank scored a throw-away group and the other drew them all.
    by_rank = {r: [c["prompts"] for c in calls2 if c["rank"] == r] for r in (0, 1)}
    assert len(by_rank[0]) == len(by_rank[1]) == len(calls1)
    for single, r0, r1 in zip(calls1, by_rank[0], by_rank[1], strict=True):
        assert sorted(single["prompts"]) in (sorted(r0 + r1), sorted(r0), sorted(r1))
