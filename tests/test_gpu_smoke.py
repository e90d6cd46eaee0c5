"""bench/gpu_smoke.py: its CPU side runs here (every part's configs and plans for the 3B and 7B shapes, and the whole
script on the tiny model); on a GPU machine the `gpu` test runs it for real."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench/gpu_smoke.py"


def _smoke(*args, timeout=600, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_every_part_builds_its_config_and_plan_for_the_3b_and_7b_shapes(tmp_path):
    plans = json.loads(_smoke("--check", "--shapes", "3b,7b", "--work", str(tmp_path)))
    assert set(plans) == {f"{s}/{p}" for s in ("3b", "7b") for p in ("sft", "sft_packed", "rl", "zero2", "zero3")}
    assert plans["3b/sft"]["parameters"] < plans["7b/sft"]["parameters"]
    assert all(p["fits_h200"] for p in plans.values())  # what does not fit falls back to LoRA, and says so
    assert plans["7b/rl"]["mode"].startswith("lora") and plans["3b/sft"]["mode"] == "full"


@pytest.mark.slow
def test_the_script_runs_every_part_on_the_tiny_model(tmp_path):
    out = tmp_path / "smoke.json"
    extensions = tmp_path / "torch_extensions"
    _smoke("--shapes", "tiny", "--parts", "sft,rl,zero3", "--steps", "3", "--work", str(tmp_path),
           "--out", str(out), env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    parts = json.loads(out.read_text())["parts"]
    sft, rl, zero3 = parts["tiny/sft"], parts["tiny/rl"], parts["tiny/zero3"]
    assert "failed" not in sft and sft["steps"] == 3 and sft["tokens_per_s"] > 0
    assert sft["profile"]["host_ops_by_count"][0]["calls"] > 0
    assert "failed" not in rl and rl["steps"] == 3
    assert rl["timing/rollout_s"] > 0 and rl["timing/update_s"] > 0 and rl["generation_tokens_per_s"] > 0
    assert "failed" not in zero3 and (zero3.get("skipped") or zero3["steps"] == 3)
    # one CPU process: no DeepSpeed kernel is compiled (a stale lock from a killed build would otherwise hang it)
    assert not extensions.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_smoke_on_the_3b_shapes(tmp_path):
    out = tmp_path / "smoke.json"
    _smoke("--shapes", "3b", "--parts", "sft,sft_packed,rl", "--work", str(tmp_path), "--out", str(out), timeout=900)
    parts = json.loads(out.read_text())["parts"]
    assert all("failed" not in p for p in parts.values()), parts
    assert parts["3b/sft"]["mfu_llm"] > 0 and abs(parts["3b/sft"]["planner_error"]) < 1
    # Packed batches carry no padding, so they move at least as many real tokens per second.
    assert parts["3b/sft_packed"]["tokens_per_s"] >= 0.9 * parts["3b/sft"]["tokens_per_s"]
