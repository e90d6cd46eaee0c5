"""What a run ran on and with: the versions of the stack, the source commit, the machine, the start and end times.
The runner records it in `run_state.json` (`context`) and writes the recipe as run beside it
(`recipe.as-run.yaml`); the report's context section reads both, so a reader of a shared report knows what produced
its numbers."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

RECIPE_AS_RUN = "recipe.as-run.yaml"  # never the name of the recipe a user keeps in the folder
PACKAGES = ("patho-r1", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "vllm", "ray")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def versions() -> dict[str, str]:
    """Installed versions of the stack (a package that is not installed is left out)."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit(folder: Path) -> str | None:
    """The commit of the source checkout patho-r1 runs from (with `+dirty` for uncommitted changes), if any."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict:
    """The driver's machine: CPU count, platform, and the GPUs torch sees."""
    info: dict = {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def run_context() -> dict:
    import patho_r1

    return {"started": now(), "versions": versions(), "commit": git_commit(Path(patho_r1.__file__).resolve().parent),
            "hardware": hardware()}
