"""`patho-r1 submit`: what a job ships (a source checkout, an installed package, a recipe outside the project), the
checks made before anything reaches a cluster, one line for each failure, and a real local Ray cluster in its own
network and PID namespaces."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from patho_r1.errors import ConfigError
from patho_r1.launch.cli import main
from patho_r1.launch.submit import RECIPE_NAME, entrypoint, package_job, source_checkout

ROOT = Path(__file__).resolve().parent.parent


def _recipe(path: Path, output_root: str, phases: list[dict] | None = None) -> Path:
    raw = {"name": "t", "output_root": output_root, "model": {"base": "tiny"},
           "data": {"synth": {"seed": 0, "n_train_tiles": 48, "n_heldout_tiles": 12, "n_sft": 40, "n_rl": 8,
                              "n_rl_heldout": 6, "n_embed_pairs": 8, "n_composed_per_task": 2, "n_eval_tiles": 6,
                              "n_eval_mcq": 3}},
           "wandb": {"mode": "disabled"}, "resources": {"cpus_per_worker": 1, "max_failures": 0},
           "phases": phases or [{"name": "eval", "type": "eval", "config": {
               "data": "{data}/eval/PathoSynth_MCQ.tsv", "checkpoints": {"base": "{phase:base}"},
               "max_new_tokens": 4, "wrong_image_control": False}}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_source_checkout_ships_patho_r1_alone_and_the_resolved_recipe(tmp_path):
    assert source_checkout() == ROOT
    recipe = _recipe(tmp_path / "elsewhere" / "r.yaml", str(tmp_path / "out"))  # a recipe outside the project
    package = package_job(recipe, tmp_path / "ship", checkout=ROOT)
    module = package.py_module
    assert module.name == "patho_r1" and (module / "__init__.py").is_file()
    for sub in ("eval/benchmarks.py", "launch/submit.py", "rl/dapo.py", "curate/prompts"):
        assert (module / sub).exists(), sub
    # nothing else at the module root: no top-level `eval`, `rl`, `launch` to shadow other projects on the job's path
    assert sorted(p.name for p in module.parent.iterdir()) == ["patho_r1"]
    assert not list(module.rglob("__pycache__"))
    shipped = sorted(p.name for p in package.working_dir.iterdir())
    assert shipped == [RECIPE_NAME, "recipes"]
    assert yaml.safe_load((package.working_dir / RECIPE_NAME).read_text())["output_root"] == str(tmp_path / "out")
    env = package.runtime_env(["extra-pkg==1"])
    assert env == {"working_dir": str(package.working_dir), "py_modules": [str(module)], "pip": ["extra-pkg==1"]}
    assert entrypoint(["eval"], True) == f"python -m patho_r1.launch.cli run {RECIPE_NAME} --phases eval --resume"


def test_an_installed_package_ships_the_recipe_alone(tmp_path):
    recipe = _recipe(tmp_path / "r.yaml", str(tmp_path / "out"))
    package = package_job(recipe, tmp_path / "ship", checkout=None)
    assert package.py_module is None and [p.name for p in package.working_dir.iterdir()] == [RECIPE_NAME]
    assert "py_modules" not in package.runtime_env()


def test_relative_paths_are_refused_or_made_absolute_before_submission(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path / "r.yaml", "runs/t")
    with pytest.raises(ConfigError, match="output_root 'runs/t' is relative.*--output-root"):
        package_job(recipe, tmp_path / "a")
    raw = yaml.safe_load(recipe.read_text())
    raw["data"] = {"root": "data/here"}
    raw["model"] = {"base": "./models/base"}
    raw["phases"][0]["config"]["data"] = "bench/items.tsv"  # a phase's own input, not under {data}
    recipe.write_text(yaml.safe_dump(raw))
    package = package_job(recipe, tmp_path / "b", output_root=str(tmp_path / "shared"))
    shipped = yaml.safe_load((package.working_dir / RECIPE_NAME).read_text())
    assert shipped["output_root"] == str(tmp_path / "shared")
    assert shipped["data"]["root"] == str(tmp_path / "data/here") and shipped["model"]["base"] == str(
        tmp_path / "models/base")
    assert shipped["phases"][0]["config"]["data"] == str(tmp_path / "bench/items.tsv")
    assert [w.split(":")[0] for w in package.warnings] == ["data.root", "model.base",  # must exist on the cluster
                                                           "phases[0] (eval).config.data"]
    raw["model"] = {"base": "Qwen/Qwen2.5-VL-3B-Instruct"}  # a hub id is the cluster's to download, left as it is
    recipe.write_text(yaml.safe_dump(raw))
    package = package_job(recipe, tmp_path / "c", output_root=str(tmp_path / "shared"))
    assert yaml.safe_load((package.working_dir / RECIPE_NAME).read_text())["model"]["base"] == raw["model"]["base"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, needle", [
    (["--output-root", "/tmp/x", "--phases", "evl"], "--phases: unknown phase(s) ['evl']"),
    ([], "output_root 'runs/t' is relative"),
    (["--output-root", "/tmp/x"], "no Ray cluster answers at http://127.0.0.1:{port}"),
])
def test_submission_failures_are_one_line(args, needle, tmp_path, capsys):
    port = _closed_port()
    recipe = _recipe(tmp_path / "r.yaml", "runs/t")
    assert main(["submit", str(recipe), "--address", f"http://127.0.0.1:{port}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle.format(port=port) in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------------------------------------------------
# A real cluster: `ray start --head` inside its own network (loopback only) and PID namespaces
# ----------------------------------------------------------------------------------------------------------------------

def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without Ray's variables: an earlier test's local Ray (token auth on, an address) must not
    reach the test cluster, which starts as a new user's would."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}


def _namespaces_available() -> bool:
    if not (shutil.which("unshare") and shutil.which("ip")) or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_submit_on_a_real_cluster_writes_to_output_root_resumes_survives_ctrl_c_spreads_and_names_token_auth(tmp_path):
    if not _namespaces_available():
        if os.environ.get("CI"):
            pytest.fail("CI runs as root with unshare and ip (iproute2): the cluster test must run there")
        pytest.skip("needs root, unshare and ip for a private network and PID namespace")
    recipe = _recipe(tmp_path / "recipe" / "r.yaml", "runs/relative-and-overridden")
    out = tmp_path / "shared" / "run"
    spread = _recipe(tmp_path / "recipe" / "spread.yaml", str(tmp_path / "unused"), phases=[
        {"name": "cpt", "type": "cpt", "resources": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
         "config": {"data": "{data}/cpt/train.jsonl", "max_steps": 2, "max_length": 256,
                    "per_device_train_batch_size": 2, "logging_steps": 1}}])
    spread_out = tmp_path / "shared" / "spread"
    ray_temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    started = time.time()
    try:
        result = subprocess.run(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", sys.executable,
             str(ROOT / "tests" / "ray_cluster.py"), str(recipe), str(out), ray_temp, str(spread), str(spread_out)],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
            env=_clean_env(HOME=str(tmp_path), WANDB_MODE="disabled"))
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    steps = json.loads(result.stdout.strip().splitlines()[-1])
    # shown with -s or on a failure: where the test's time goes
    print(f"cluster steps, seconds: {steps['seconds']}, all {time.time() - started:.1f}")
    assert steps["first"]["rc"] == 0 and "SUCCEEDED" in steps["first"]["out"]
    assert (out / "report.md").is_file() and (out / "eval" / "summary.json").is_file()  # on the shared path
    assert (out / "recipe.as-run.yaml").is_file() and "## Context" in (out / "report.md").read_text()
    state = json.loads((out / "run_state.json").read_text())
    assert state["phases"]["eval"]["status"] == "skipped"  # the last run here was the --resume: eval was complete
    assert steps["resumed"]["rc"] == 0 and "skipped" in steps["resumed"]["out"]
    # two nodes: STRICT_SPREAD puts one worker on each, and both ranks' logs land in the shared run folder
    assert steps["second_node"]["rc"] == 0, steps["second_node"]
    assert steps["spread"]["rc"] == 0, steps["spread"]["out"]
    assert (spread_out / "cpt" / "model").is_dir()
    assert {p.name for p in (spread_out / "logs").glob("cpt.rank*.log")} == {"cpt.rank0.log", "cpt.rank1.log"}
    assert steps["interrupted"]["rc"] == 130, steps["interrupted"]
    assert "RUNNING" in steps["interrupted"]["status"] or "PENDING" in steps["interrupted"]["status"], steps[
        "interrupted"]  # the job goes on without its client
    assert "keeps running" in steps["interrupted"]["err"] and "ray job stop" in steps["interrupted"]["err"]
    assert "Traceback" not in steps["interrupted"]["err"]
    # a cluster that asks for token auth, a client without it: exit 2 and one line naming the variables to set
    auth = steps["token_auth"]
    assert auth["rc"] == 2 and "Traceback" not in auth["err"] and len(auth["err"].strip().splitlines()) == 1, auth
    assert "export RAY_AUTH_MODE=token" in auth["err"]


TAIL_SCRIPT = """
import asyncio, sys
from patho_r1.launch.submit import tail

class Client:  # a job whose log stream sends a line, then waits (a long training phase)
    async def tail_job_logs(self, job_id):
        yield "[run] 1/1 sft\\n"
        await asyncio.sleep(3600)
        yield "never"

sys.exit(tail(Client(), "raysubmit_x", "http://127.0.0.1:8265"))
"""


def test_one_ctrl_c_while_tailing_leaves_at_once_with_130(tmp_path):
    """One Ctrl-C ends the client within a second, whatever the log stream is awaiting: 130, the job named, the
    commands to follow or stop it, no traceback."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", TAIL_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path,  # Ctrl-C as a terminal gives it, even under `.ci/run &`
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("[run]")
    proc.send_signal(signal.SIGINT)
    sent = time.time()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - sent < 1.5, (proc.returncode, err)
    assert "keeps running" in err and "ray job stop raysubmit_x" in err and "Traceback" not in err
