"""The preflight of `run`, `run --dry-run` and `plan`: every phase's attention and GPU-only packages (flash-attn,
vLLM, DeepSpeed, Liger) must import where the phase runs, or the command refuses with one line per problem and its fix,
before Ray starts.  A GPU machine is simulated (`gpu_here`), and packages are made present, absent or broken with
stand-in modules on the import path."""

from __future__ import annotations

import importlib.util
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from patho_r1.errors import ConfigError
from patho_r1.launch import preflight, runner
from patho_r1.launch.cli import main
from patho_r1.launch.recipe import build_plan

ROOT = Path(__file__).resolve().parent.parent
RECIPE_3B = str(ROOT / "recipes/patho-r1-3b.yaml")
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(autouse=True)
def fresh_import_checks():
    preflight.import_error.cache_clear()  # each test decides which packages exist
    yield
    preflight.import_error.cache_clear()


@pytest.fixture
def gpu_machine(monkeypatch):
    monkeypatch.setattr(preflight, "gpu_here", lambda: True)


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """`packages(vllm="", flash_attn="raise ImportError(...)")`: stand-in packages on this process's import path and
    on the one the import checks' child interpreters get."""
    root = tmp_path / "site"

    def install(**modules: str) -> None:
        for name, body in modules.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "__init__.py").write_text(textwrap.dedent(body))
        monkeypatch.syspath_prepend(str(root))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))

    return install


def _recipe(tmp_path, raw: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _3b(tmp_path, **defaults) -> str:
    raw = yaml.safe_load(open(RECIPE_3B))
    raw["defaults"].update(defaults)
    return _recipe(tmp_path, raw)


def test_3b_dry_run_without_flash_attn_plans_on_the_fallback(gpu_machine, packages, capsys):
    """The issue's done-criterion: on a GPU machine without flash-attn, `auto` runs SDPA for text and torch's varlen
    kernel for the vision tower, and the dry-run plans."""
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    packages(vllm="")
    code = main(["run", RECIPE_3B, "--dry-run"])
    captured = capsys.readouterr()
    if not HAS_DEEPSPEED:
        assert code == 2
        assert "deepspeed: recipes/deepspeed/zero2.json needs the deepspeed package (not installed)" in captured.err
        return
    assert code == 0, captured.err
    assert "cpt [GPU]: attention text sdpa, vision varlen; deepspeed imports" in captured.out
    assert "rl [GPU]: attention text sdpa, vision varlen; deepspeed imports; vllm imports" in captured.out
    assert "eval [GPU]: vllm imports" in captured.out
    assert "memory plan:" in captured.out


def test_3b_without_vllm_is_refused_one_line_per_problem_before_ray(gpu_machine, capsys, monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    started = []
    monkeypatch.setattr(runner, "init_ray", lambda *a, **k: started.append(1))
    for command in (["run", RECIPE_3B, "--dry-run"], ["run", RECIPE_3B], ["plan", RECIPE_3B]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "memory plan" not in err and not started
        assert ("  phase rl: rollout.engine: vllm needs the vllm package (not installed): pip install -e '.[vllm]', "
                "or set rollout.engine: hf (resources.rollout_engine: hf)\n") in err
        assert ("  phase eval: engine: vllm needs the vllm package (not installed): pip install -e '.[vllm]', or set "
                "engine: hf") in err
        assert err.count("\n  ") == (2 if HAS_DEEPSPEED else 3)  # deepspeed, where missing, is one more line


def test_flash_attention_2_without_flash_attn_names_the_phases_field_and_fix(gpu_machine, packages, tmp_path):
    packages(vllm="")
    with pytest.raises(ConfigError) as info:
        raw = yaml.safe_load(open(_3b(tmp_path, attn_implementation="flash_attention_2")))
        preflight.check_gpu_stack(build_plan(raw, source="3b"))
    text = str(info.value)
    assert ("phases cpt, sft, rl: attn_implementation: flash_attention_2 needs the flash-attn package (not "
            "installed): pip install -e '.[flash]' --no-build-isolation, or set attn_implementation: auto") in text
    if HAS_DEEPSPEED:
        assert "\n" not in text  # the one problem is one line


def test_an_installed_flash_attn_that_does_not_import_is_refused(gpu_machine, packages, tmp_path):
    """`auto` picks flash-attn when it is installed; a build against another torch fails to import (undefined
    symbol), which only an import finds: it is caught here, not when the model loads on a worker."""
    packages(vllm="", flash_attn="raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')")
    with pytest.raises(ConfigError) as info:
        preflight.check_gpu_stack(build_plan(yaml.safe_load(open(_3b(tmp_path))), source="3b"))
    text = str(info.value)
    assert ("phases cpt, sft, rl: attn_implementation: auto needs the flash-attn package, which is installed but "
            "does not import (ImportError: flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice): "
            "pip install -e '.[flash]' --no-build-isolation --force-reinstall") in text
    assert "uninstall flash-attn (auto then runs SDPA)" in text


def test_a_working_flash_attn_is_what_auto_runs(gpu_machine, packages, tmp_path):
    packages(vllm="", flash_attn="")
    raw = yaml.safe_load(open(_3b(tmp_path)))
    raw["resources"]["deepspeed"] = None
    stacks = preflight.check_gpu_stack(build_plan(raw, source="3b"))
    cpt = next(s for s in stacks if s.name == "cpt")
    assert cpt.attention == "text flash_attention_2, vision flash_attn"
    assert [n.module for n in cpt.needs] == ["flash_attn"]


def test_liger_is_checked_on_gpu_and_refused_on_cpu(gpu_machine, packages, tmp_path):
    packages(vllm="")
    raw = yaml.safe_load(open(_3b(tmp_path)))
    raw["phases"][1]["config"]["trl"] = {"use_liger_kernel": True}
    with pytest.raises(ConfigError, match=r"phase sft: trl\.use_liger_kernel: true needs the liger-kernel package "
                                          r"\(not installed\): pip install -e '\.\[liger\]'"):
        preflight.check_gpu_stack(build_plan(raw, source="3b"))
    raw["phases"][1]["resources"] = {"use_gpu": False, "deepspeed": None}
    raw["defaults"]["dtype"] = "float32"
    with pytest.raises(ConfigError, match=r"phase sft: trl\.use_liger_kernel: Liger's kernels are Triton"):
        preflight.check_gpu_stack(build_plan(raw, source="3b"))


def test_gpu_only_settings_on_a_cpu_phase_are_refused_on_any_machine(tmp_path):
    raw = yaml.safe_load(open(ROOT / "recipes/demo.yaml"))
    raw["output_root"] = str(tmp_path / "out")
    raw["resources"]["rollout_engine"] = "vllm"
    raw["defaults"]["attn_implementation"] = "flash_attention_2"
    eval_phase = next(p for p in raw["phases"] if p["type"] == "eval")
    eval_phase["config"]["engine"] = "vllm"
    with pytest.raises(ConfigError) as info:
        preflight.check_gpu_stack(build_plan(raw, source="demo"))
    lines = str(info.value).splitlines()
    assert lines[0] == "demo: 3 settings cannot run in this environment"
    assert ("  phases cpt, sft, rl: attn_implementation: flash_attention_2 needs a CUDA GPU; use auto (SDPA here) or "
            "sdpa") in lines
    assert ("  phase rl: rollout.engine: vllm needs a CUDA GPU and this phase runs on the CPU (resources.use_gpu: "
            "false); set rollout.engine: hf") in lines
    assert any(line.startswith("  phase eval: engine: vllm needs a CUDA GPU") for line in lines)


def test_only_the_selected_phases_are_checked(gpu_machine, capsys):
    assert main(["run", RECIPE_3B, "--dry-run", "--phases", "cpt,sft"]) == (0 if HAS_DEEPSPEED else 2)


def test_from_a_machine_without_a_gpu_the_gpu_phases_are_left_to_where_they_run(capsys, monkeypatch):
    """Planning a cluster run on a laptop: this environment says nothing about the cluster's, so the GPU phases'
    packages are not checked here (`run` on the cluster checks them on a GPU node before the first phase)."""
    monkeypatch.setattr(preflight, "gpu_here", lambda: False)
    assert main(["run", RECIPE_3B, "--dry-run"]) == 0
    assert main(["plan", RECIPE_3B]) == 0
    out = capsys.readouterr().out
    assert "cpt, sft, rl, eval [GPU]: not checked here: this machine has no GPU" in out


def test_a_gpu_recipe_on_a_local_ray_without_a_gpu_is_refused_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "gpu_here", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = yaml.safe_load(open(RECIPE_3B))
    raw.update(output_root=str(tmp_path / "out"))
    raw["resources"]["ray_address"] = None
    with pytest.raises(ConfigError, match=r"phase\(s\) cpt, sft, rl, eval: resources.use_gpu is true, but this "
                                          r"machine has no CUDA GPU and the recipe starts a local Ray"):
        runner.run_recipe(build_plan(raw, source="3b"))
    assert not (tmp_path / "out").exists()


def test_a_driver_without_a_gpu_checks_the_gpu_phases_on_a_gpu_node(tmp_path, monkeypatch):
    """`patho-r1 submit`: the job's driver runs on the head node (no GPU in launch/ray-cluster.yaml), so the GPU
    phases are checked by a Ray task on a node with the phase's GPUs, before the first phase starts.  Here a local
    Ray that declares one (pretend) GPU stands in for the cluster."""
    import ray

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    monkeypatch.setattr(preflight, "gpu_here", lambda: False)
    raw = yaml.safe_load(open(_3b(tmp_path, attn_implementation="flash_attention_2")))
    raw["resources"]["num_workers"] = 1
    raw["phases"] = [p for p in raw["phases"] if p["name"] == "sft"]
    raw["phases"][0]["resources"] = {"deepspeed": None, "cpus_per_worker": 1}
    plan = build_plan(raw, source="3b")
    ray.shutdown()  # a Ray an earlier test left connected
    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.raises(ConfigError, match=r"3b \(checked on a GPU node of the cluster\): phase sft: "
                                              r"attn_implementation: flash_attention_2 needs the flash-attn package "
                                              r"\(not installed\)"):
            preflight.check_on_cluster(plan, plan.phases, runner.RunConsole(verbose=False))
    finally:
        ray.shutdown()
