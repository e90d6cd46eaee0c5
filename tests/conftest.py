"""Shared fixtures: one tiny model and one small synthetic world per test session (built in a few seconds)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _built_once(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built once per test run however many pytest-xdist workers ask for it (the pattern
    pytest-xdist's documentation gives): the first worker to take the lock builds it under the run's shared temporary
    folder, the others wait for it and reuse it.  `build(folder)` returns the path the fixture gives."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above every worker's own
    done = base / f"{name}.built"
    with FileLock(str(base / f"{name}.lock")):
        if not done.is_file():
            done.write_text(str(build(base / name)))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from patho_r1.fixtures.tiny import build_tiny_model

    return _built_once(tmp_path_factory, "tiny", lambda folder: build_tiny_model(folder / "model"))


@pytest.fixture(scope="session")
def small_world_config():
    from patho_r1.fixtures.synth import WorldConfig

    return WorldConfig(n_train_tiles=96, n_heldout_tiles=36, n_sft=40, n_rl=24, n_rl_heldout=12, n_embed_pairs=24,
                       n_composed_per_task=8, n_eval_tiles=24, n_eval_mcq=12)


def _world(folder: Path, seed: int, config) -> Path:
    from patho_r1.fixtures.synth import generate_world

    generate_world(folder, seed=seed, config=config)
    return folder


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory, small_world_config):
    return _built_once(tmp_path_factory, "world", lambda folder: _world(folder, 0, small_world_config))


@pytest.fixture(scope="session")
def learning_world(tmp_path_factory):
    """A world large enough for the tiny model to learn from in about a minute."""
    from patho_r1.fixtures.synth import WorldConfig

    config = WorldConfig(n_train_tiles=300, n_heldout_tiles=60, n_sft=900, n_rl=96, n_rl_heldout=48,
                         n_embed_pairs=48, n_composed_per_task=8, n_eval_tiles=60, n_eval_mcq=48)
    return _built_once(tmp_path_factory, "learning_world", lambda folder: _world(folder, 1, config))


@pytest.fixture(scope="session")
def sft_model_dir(tiny_model_dir, learning_world, tmp_path_factory):
    """The tiny model after chain-of-thought SFT (vision tower frozen), shared by the SFT and RL learning tests."""
    from patho_r1.sft.config import SFTPhaseConfig
    from patho_r1.sft.sft import run_sft

    def build(out: Path) -> Path:
        cfg = SFTPhaseConfig(model=str(tiny_model_dir), data=str(learning_world / "sft/train.jsonl"),
                             output_dir=str(out), max_steps=450, per_device_train_batch_size=8, learning_rate=2e-3,
                             warmup_ratio=0.05, max_length=512, save_steps=10_000, logging_steps=50,
                             wandb={"mode": "disabled"}, freeze_vision_tower=True, freeze_projector=True)
        return run_sft(cfg).model_dir

    return _built_once(tmp_path_factory, "sft_run", build)


@pytest.fixture(scope="session")
def vlmeval_scorers():
    """VLMEvalKit's own scorer modules, loaded without `vlmeval/__init__.py` and `vlmeval/dataset/__init__.py`
    (which import every model and torchvision).  `make test` installs ms-vlmeval 0.0.20 without its dependencies
    for this; in CI a missing vlmeval fails the tests that need it instead of skipping them."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.find_spec("vlmeval")
    if spec is None:
        if os.environ.get("CI"):
            pytest.fail("vlmeval is not installed: `pip install --no-deps ms-vlmeval==0.0.20 validators sty`")
        pytest.skip("vlmeval is not installed (make test installs it)")
    root = Path(spec.origin).parent
    for name, sub in (("vlmeval", root), ("vlmeval.dataset", root / "dataset")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(sub)]
            sys.modules[name] = package
    from vlmeval.dataset.utils import yorn
    from vlmeval.utils import matching_util

    return types.SimpleNamespace(can_infer=matching_util.can_infer, yorn_extraction=yorn.YOrN_Extraction)


@pytest.fixture(scope="session")
def vlmeval_judge_stack(vlmeval_scorers):
    """VLMEvalKit's short-answer datasets and its OpenAI judge wrapper, without `vlmeval/api/__init__.py` (which
    imports every API model): `build_judge` imports three names from `vlmeval.api`; two are the real classes, and
    SiliconFlowAPI, which only its `qwen-*`/`deepseek` judge names reach, is a placeholder that refuses use."""
    import importlib
    import sys
    import types
    from pathlib import Path

    if "vlmeval.api" not in sys.modules:
        package = types.ModuleType("vlmeval.api")
        package.__path__ = [str(Path(sys.modules["vlmeval"].__path__[0]) / "api")]
        sys.modules["vlmeval.api"] = package
        package.OpenAIWrapper = importlib.import_module("vlmeval.api.gpt").OpenAIWrapper
        package.HFChatModel = importlib.import_module("vlmeval.api.hf_chat_model").HFChatModel

        def _no_siliconflow(*args, **kwargs):
            raise RuntimeError("SiliconFlowAPI is not loaded in the test stack")

        package.SiliconFlowAPI = _no_siliconflow
    from vlmeval.dataset import image_shortqa

    return image_shortqa


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def hf_server(tiny_model_dir):
    """`transformers serve` with the tiny Qwen2.5-VL: a real OpenAI-compatible server on the CPU."""
    port = _free_port()
    exe = Path(sys.executable).parent / "transformers"
    log = open(Path(tiny_model_dir).parent / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([str(exe), "serve", str(tiny_model_dir), "--port", str(port), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {Path(log.name).read_text()[-2000:]}") from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("transformers serve did not come up in 120 s")
    yield url + "/v1", str(tiny_model_dir)
    proc.terminate()
    proc.wait(30)
    log.close()


# ----------------------------------------------------------------------------------------------------------------------
# Three pytest-xdist workers on two cores (the Makefile's test target: -n 3 --dist load --maxschedchunk 1)
# ----------------------------------------------------------------------------------------------------------------------

def pytest_configure(config):
    """Each worker's torch gets its share of the cores: two workers of two threads each on two cores spend their time
    waiting for each other (OpenMP threads spin: a 0.3 s vision-tower test took 78 s beside one busy process).  The
    processes a test starts (a `patho-r1` driver, a server, a bench script) get the same share through the
    environment; Ray's workers already run one thread per CPU they hold."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(name, str(share))


# The test that builds the shared SFT model (`sft_model_dir`, about a minute and a half) goes first, and the tests
# that only read it after every other slow test: when they came up while it was still being built, a worker sat idle
# for the rest of the build (52-65 s with two workers; 95 s with three when the build came after the longest tests,
# measured in CI).  Then the longest tests, so that they start at once on the other workers.
BUILDS_SHARED = ("tests/test_learning.py::test_sft_teaches",)
LONGEST_FIRST = ("tests/test_liveness.py::test_kill_anywhere", "tests/test_submit.py::test_submit_on_a_real_cluster",
                 "tests/test_multiworker.py::test_sft_two_workers")
READS_SHARED = ("tests/test_learning.py::test_rl_raises",)


def pytest_collection_modifyitems(config, items):
    """The shared SFT build and the longest tests first, then the other slow end-to-end ones, so that the workers
    start them early and the short ones fill in around them (xdist hands out tests in collection order, one at a time
    with --maxschedchunk 1); file order otherwise."""
    def rank(item, prefixes) -> int | None:
        return next((i for i, prefix in enumerate(prefixes) if item.nodeid.startswith(prefix)), None)

    def order(item) -> tuple[int, int]:
        for group, prefixes in enumerate((BUILDS_SHARED, LONGEST_FIRST)):
            if (i := rank(item, prefixes)) is not None:
                return (group, i)
        if rank(item, READS_SHARED) is not None:
            return (3, 0)
        return (2, 0) if item.get_closest_marker("slow") else (4, 0)

    items.sort(key=order)  # stable
