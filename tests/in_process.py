"""A recipe's phases run one after the other in this test process, without Ray: the single worker a Ray run would
start, without a cluster's start-up (about 15 s of CPU per phase on the 2-core CI machine).  Tests use it for the
reference run they compare a Ray run against; the claim under test (Ray workers, kills, resumes) stays on Ray."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def run_recipe_in_this_process(recipe: Path, root: Path, inputs: Path, phases: list[dict] | None = None) -> Path:
    """Run `recipe`'s phases (or `phases`) with output under `root/out`, reading the base model and the world that a
    Ray run of the same recipe prepared under `inputs` (its output root).  One torch thread, as a Ray worker with one
    CPU has (Ray sets OMP_NUM_THREADS=1): the float reductions, and so the weights, are those of that worker."""
    from patho_r1.launch.recipe import load_plan
    from patho_r1.launch.workers import run_phase

    raw = yaml.safe_load(recipe.read_text())
    raw.update(output_root=str(root / "out"), model={"base": str(inputs / "base-model")},
               data={"root": str(inputs / "world")}, resources={"num_workers": 1, "cpus_per_worker": 1})
    if phases is not None:
        raw["phases"] = phases
    root.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    plan = load_plan(root / "recipe.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for phase in raw["phases"]:
            planned = plan.phase(phase["name"])
            run_phase(planned.type, planned.config.model_dump(mode="json"))
    finally:
        torch.set_num_threads(threads)
    return root / "out"
