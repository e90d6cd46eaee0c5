"""`patho-r1 submit`: the recipe runner as a Ray job on a running cluster (Ray's job API, from Python).

    patho-r1 submit recipes/demo.yaml --address http://HEAD:8265 --output-root /shared/runs/demo

What the job gets, and why:
- **The recipe, resolved** (`recipe.yaml` in the job's working folder): a Ray job runs in a package folder Ray unpacks
  under the head node's session directory, so every place the run writes must be absolute and on storage all nodes
  share. A relative `output_root` is refused before submission (`--output-root` sets one); a relative `data.root` or
  `model.base` is made absolute on this machine, and one that does not exist here is named in a warning (it must exist
  on the cluster).
- **The code, only from a source checkout**: the `patho_r1` package assembled from `pyproject.toml`'s `package-dir`
  mapping, shipped as a `py_modules` entry, so nothing but `patho_r1` lands on the job's import path (shipping the
  checkout itself would make its top-level `eval/`, `rl/`, `launch/` importable as themselves). With the checkout's
  `recipes/` beside the recipe, a recipe's `recipes/deepspeed/...` reference works as in a local run. From an installed
  package only the recipe travels: the nodes run their own installed patho-r1 (`launch/ray-cluster.yaml`).
- The entrypoint is `python -m patho_r1.launch.cli run recipe.yaml`: inside the job, the runner joins the cluster it
  runs in (`RAY_ADDRESS`, which Ray sets for a job's driver).

Every failure a user can cause is one line: an unknown `--phases` name, a relative `output_root`, an unreachable
address, a cluster that asks for token auth.  Ctrl-C while tailing leaves the job running (unless
`--stop-on-interrupt`) and prints how to follow and stop it.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from patho_r1.config import is_local_model_path, read_yaml
from patho_r1.errors import ConfigError, PathoError
from patho_r1.launch.recipe import Plan, absolute_inputs, build_plan

RECIPE_NAME = "recipe.yaml"
_NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


class SubmitError(PathoError):
    """The cluster cannot be reached, refused us, or the job failed to start: one line, no traceback."""


@dataclass
class JobPackage:
    """What one submission ships: a working folder (the resolved recipe, the checkout's `recipes/`) and, from a
    source checkout, the assembled `patho_r1` package."""

    working_dir: Path
    py_module: Path | None
    plan: Plan
    warnings: list[str] = field(default_factory=list)

    def runtime_env(self, extra_pip: list[str] | None = None) -> dict:
        env: dict = {"working_dir": str(self.working_dir)}
        if self.py_module is not None:
            env["py_modules"] = [str(self.py_module)]
        if extra_pip:
            env["pip"] = list(extra_pip)
        return env


def source_checkout() -> Path | None:
    """The project root when patho-r1 runs from a source checkout (an editable install or the tree itself), else
    None (an installed package: its folder holds no `pyproject.toml` of ours)."""
    import patho_r1

    root = Path(patho_r1.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        project = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if project.get("project", {}).get("name") == "patho-r1" else None


def assemble_package(root: Path, dest: Path) -> Path:
    """`dest/patho_r1`, laid out as the installed package is: each folder of `package-dir` copied to its import
    path (`patho/` -> `patho_r1/`, `rl/` -> `patho_r1/rl/`, ...)."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    package = dest / "patho_r1"
    for name, folder in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):  # the root package first
        target = dest.joinpath(*name.split("."))
        shutil.copytree(root / folder, target, ignore=_NOT_SHIPPED, dirs_exist_ok=True)
    return package


def resolve_recipe(raw: dict, recipe: Path, output_root: str | None) -> tuple[dict, list[str]]:
    """The recipe as the job must read it, and the warnings for paths that cannot be checked from here."""
    raw = dict(raw)
    if output_root is not None:
        raw["output_root"] = output_root
    root = str(raw.get("output_root") or "")
    if not Path(root).expanduser().is_absolute():
        raise ConfigError(f"{recipe}: output_root {root!r} is relative: a Ray job runs in a package folder Ray unpacks "
                          "under the head node's session directory, where a relative path resolves and is lost; give "
                          "an absolute path on storage every node shares (--output-root /shared/runs/NAME)")
    raw["output_root"] = str(Path(root).expanduser())
    warnings = []
    for section, key in (("data", "root"), ("model", "base")):
        value = (raw.get(section) or {}).get(key)
        if not isinstance(value, str) or (section == "model" and (value == "tiny" or not is_local_model_path(value))):
            continue
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path.cwd() / path
        raw[section] = {**raw[section], key: str(path)}
        if not path.exists():
            warnings.append(f"{section}.{key}: {path} does not exist on this machine; it must exist on every cluster "
                            "node")
    return raw, warnings


def package_job(recipe: str | Path, dest: Path, *, output_root: str | None = None,
                checkout: Path | None = None) -> JobPackage:
    """Lay out what the job ships under `dest`; the recipe is validated (and its phases planned) first."""
    recipe = Path(recipe)
    raw, warnings = resolve_recipe(read_yaml(recipe), recipe, output_root)
    plan = build_plan(raw, source=str(recipe))  # every field and phase config: a bad recipe fails here, not later
    for i, planned in enumerate(plan.phases):  # a phase's relative input path, as the roots above: from here
        for name, path in absolute_inputs(planned.config, raw["phases"][i].get("config") or {}).items():
            if not Path(path).exists():
                warnings.append(f"phases[{i}] ({planned.spec.name}).config.{name}: {path} does not exist on this "
                                "machine; it must exist on every cluster node")
    working_dir = dest / "job"
    working_dir.mkdir(parents=True)
    (working_dir / RECIPE_NAME).write_text(yaml.safe_dump(raw, sort_keys=False))
    py_module = None
    if checkout is not None:
        if (checkout / "recipes").is_dir():
            shutil.copytree(checkout / "recipes", working_dir / "recipes", ignore=_NOT_SHIPPED)
        py_module = assemble_package(checkout, dest / "modules")
    return JobPackage(working_dir, py_module, plan, warnings)


def entrypoint(phases: list[str] | None, resume: bool) -> str:
    command = ["python", "-m", "patho_r1.launch.cli", "run", RECIPE_NAME]
    if phases:
        command += ["--phases", ",".join(phases)]
    if resume:
        command.append("--resume")
    return shlex.join(command)


def connect(address: str):
    """A job client for the cluster's dashboard, or one line saying why there is none."""
    import logging

    from ray.job_submission import JobSubmissionClient

    # the SDK's own loggers say INFO at every package upload and socket close: keep the console to our lines
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address)
    except ConnectionError as exc:
        if "auth" in str(exc).lower() or "token" in str(exc).lower():
            raise SubmitError(_token_hint(address)) from None
        raise SubmitError(f"no Ray cluster answers at {address}: is the head node up, and the dashboard's port "
                          "reachable (an SSH tunnel: ray dashboard CLUSTER.yaml)?") from None
    except Exception as exc:  # Ray's AuthenticationError and its kin, whose classes move between releases
        if "auth" in type(exc).__name__.lower() or "token" in str(exc).lower():
            raise SubmitError(_token_hint(address)) from None
        raise


def _token_hint(address: str) -> str:
    return (f"the Ray cluster at {address} asks for token auth: export RAY_AUTH_MODE=token, with the cluster's "
            "token in RAY_AUTH_TOKEN (or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")


def submit(recipe: str, *, address: str, phases: str | None = None, resume: bool = False,
           extra_pip: list[str] | None = None, wait: bool = True, output_root: str | None = None,
           stop_on_interrupt: bool = False) -> int:
    from patho_r1.launch.runner import select_phases

    selected = [p.strip() for p in phases.split(",")] if phases else None
    with tempfile.TemporaryDirectory(prefix="patho-r1-job-") as tmp:
        package = package_job(recipe, Path(tmp), output_root=output_root, checkout=source_checkout())
        plan = package.plan
        select_phases(plan, selected)  # an unknown --phases name fails here, not on the cluster
        for warning in package.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        client = connect(address)
        try:
            job_id = client.submit_job(entrypoint=entrypoint(selected, resume),
                                       runtime_env=package.runtime_env(extra_pip),
                                       metadata={"recipe": plan.recipe.name, "recipe_hash": plan.recipe_hash,
                                                 "output_root": plan.recipe.output_root})
        except RuntimeError as exc:  # the job API's refusal: its first line is the reason
            raise SubmitError(f"the cluster at {address} refused the job: {str(exc).splitlines()[0]}") from None
    # flushed: piped into `tee` or a CI log, the job id must show before the (long) tail, not with its first lines
    print(f"submitted {plan.recipe.name} as job {job_id} to {address}; outputs in {plan.recipe.output_root}",
          flush=True)
    return tail(client, job_id, address, stop_on_interrupt) if wait else 0


def tail(client, job_id: str, address: str, stop_on_interrupt: bool = False) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED.  Ctrl-C: 130, the job left running (or stopped)."""
    import asyncio

    from ray.job_submission import JobStatus

    async def stream():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        if stop_on_interrupt:
            client.stop_job(job_id)
            print(f"\ninterrupted: job {job_id} stopped", file=sys.stderr)
        else:
            print(f"\ninterrupted: job {job_id} keeps running. Follow it: ray job logs -f {job_id} --address "
                  f"{address}; stop it: ray job stop {job_id} --address {address}", file=sys.stderr)
        return 130
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
