"""DeepSpeed on CPU (the [deepspeed] extra, installed by `make test`): a ZeRO-3 phase's final checkpoint holds the
whole trained weights, gathered from the partitions, equal to those of the same run without DeepSpeed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sft(tiny_model_dir, world_dir, out, *deepspeed) -> dict[str, torch.Tensor]:
    proc = subprocess.run([sys.executable, str(ROOT / "tests/deepspeed_sft.py"), str(tiny_model_dir), str(world_dir),
                           str(out), *deepspeed], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "MASTER_PORT": str(_free_port()),
                               "TORCH_EXTENSIONS_DIR": str(out.parent / "torch_extensions")})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # one CPU process: DeepSpeed's shared-memory all-reduce kernel is not compiled (40 s of g++ on a fresh machine)
    assert not (out.parent / "torch_extensions").exists()
    return load_file(str(out / "model/model.safetensors"))


def _plain_sft(tiny_model_dir, world_dir, out) -> dict[str, torch.Tensor]:
    """The same run without DeepSpeed, in this process (no process group to set up)."""
    import deepspeed_sft

    deepspeed_sft.run(str(tiny_model_dir), str(world_dir), str(out))
    return load_file(str(out / "model/model.safetensors"))


def test_zero3_final_checkpoint_is_the_gathered_trained_model(tiny_model_dir, world_dir, tmp_path):
    pytest.importorskip("deepspeed")
    plain = _plain_sft(tiny_model_dir, world_dir, tmp_path / "plain")
    zero3 = _sft(tiny_model_dir, world_dir, tmp_path / "zero3", str(ROOT / "recipes/deepspeed/zero3.json"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert set(zero3) == set(plain)
    # Before the fix each tensor was the rank's partition: shape (0,) on one process.
    assert all(zero3[k].shape == base[k].shape for k in base)
    moved = max(float((plain[k].float() - base[k].float()).abs().max()) for k in base)
    worst = max(float((zero3[k].float() - plain[k].float()).abs().max()) for k in base)
    assert worst < 0.01 * moved, (worst, moved)
