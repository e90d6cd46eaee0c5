"""The `embed_bench` phase: a recipe ends with an embedding suite (PMEB) over the models it trained.

    - name: pmeb
      type: embed_bench
      config:
        data: /data/pmeb                                   # the folder the suite's task paths are relative to
        models: ["homie={phase:embed}", "pathoclip={phase:clip}", "plip=clip:/models/plip"]

It writes the suite's folder (`embed.bench_report.write_outputs`) to OUTPUT_DIR/bench; the run report shows its
tables and plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from patho_r1.config import PhaseConfig, PhaseResult


class EmbedBenchConfig(PhaseConfig):
    suite: str = Field("pmeb", description="a shipped suite or a suite YAML")
    data: str = Field(description="the folder the suite's task paths are relative to")
    models: list[str] = Field(min_length=1, description="[LABEL=][homie:|clip:]PATH, as `embed bench --model`")
    tasks: list[str] | None = None
    strict: bool = False
    max_samples: int | None | Literal["suite"] = "suite"
    bootstrap: int = Field(1000, ge=10)
    batch_size: int = Field(32, ge=1)

    def input_paths(self) -> dict[str, str]:
        return {"data": self.data}


def run_embed_bench(cfg: EmbedBenchConfig) -> PhaseResult:
    from patho_r1.embed.bench import BenchOptions, load_suite, parse_model, run_bench
    from patho_r1.embed.bench_report import HEADLINE, write_outputs

    suite = load_suite(cfg.suite)
    models = [parse_model(m) for m in cfg.models]
    opts = BenchOptions(tasks=cfg.tasks, strict=cfg.strict, batch_size=cfg.batch_size, n_boot=cfg.bootstrap,
                        max_samples=cfg.max_samples, seed=cfg.seed, note=lambda line: print(f"embed_bench: {line}"))
    results = run_bench(suite, cfg.data, models, opts)
    write_outputs(Path(cfg.output_dir) / "bench", results)
    metrics = {f"{task}/{model}/{d}": m[HEADLINE[d]] for task, t in results["tasks"].items()
               for model, r in t["results"].items() for d, m in r.items()}
    return PhaseResult(model_dir=Path(cfg.output_dir), metrics=metrics)
