"""`patho-r1 submit`: the recipe runner as a Ray job on a running cluster (ray job submit, from Python)."""

from __future__ import annotations

import shlex
from pathlib import Path

from patho_r1.launch.recipe import load_plan


def submit(recipe: str, *, address: str, phases: str | None = None, resume: bool = False,
           extra_pip: list[str] | None = None, wait: bool = True) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    plan = load_plan(recipe)  # fail here, not on the cluster, on a bad recipe
    project_root = Path(__file__).resolve().parent.parent
    entry = ["patho-r1", "run", str(Path(recipe).resolve().relative_to(project_root))
             if Path(recipe).resolve().is_relative_to(project_root) else recipe]
    if phases:
        entry += ["--phases", phases]
    if resume:
        entry.append("--resume")
    # The cluster's nodes have patho-r1 installed (see launch/ray-cluster.yaml); the job ships the recipe folder.
    runtime_env: dict = {"working_dir": str(project_root),
                         "excludes": [".venv", "runs", "wandb", ".git", "*.egg-info", "__pycache__"]}
    if extra_pip:
        runtime_env["pip"] = list(extra_pip)
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entry), runtime_env=runtime_env,
                               metadata={"recipe": plan.recipe.name, "recipe_hash": plan.recipe_hash})
    print(f"submitted {plan.recipe.name} as job {job_id} to {address}")
    if not wait:
        return 0
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1
