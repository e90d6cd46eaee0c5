"""The run report: MCQ accuracy and format rate per checkpoint, retrieval Recall@1, wall time per phase."""

from __future__ import annotations

import json
from pathlib import Path

from patho_r1.launch.recipe import Plan


def collect(plan: Plan, state: dict) -> dict:
    report: dict = {"recipe": plan.recipe.name, "recipe_hash": plan.recipe_hash, "mcq": {}, "retrieval": {},
                    "wall_time_s": {}}
    for phase in plan.phases:
        entry = state["phases"].get(phase.name, {})
        if entry:
            report["wall_time_s"][phase.name] = round(float(entry.get("seconds", 0.0)), 1)
        if phase.type == "eval":
            summary = Path(phase.final_dir) / "summary.json"
            if summary.is_file():
                report["mcq"].update(json.loads(summary.read_text()))
        if phase.type == "embed":
            metrics = Path(phase.config.output_dir) / "eval" / "metrics.json" if phase.config else None
            if metrics is not None and metrics.is_file():
                report["retrieval"][phase.name] = json.loads(metrics.read_text())
    return report


def render_markdown(report: dict) -> str:
    lines = [f"# patho-r1 run report: {report['recipe']}", "", f"recipe hash `{report['recipe_hash']}`", ""]
    if report["mcq"]:
        lines += ["## Held-out MCQ", "", "| checkpoint | accuracy | strict accuracy | format rate | chance |",
                  "|---|---|---|---|---|"]
        for label, r in report["mcq"].items():
            lines.append(f"| {label} | {r['accuracy']:.3f} | {r['strict_accuracy']:.3f} | {r['format_rate']:.3f} | "
                         f"{r['chance']:.3f} |")
        lines.append("")
    for name, r in report["retrieval"].items():
        lines += [f"## Composed retrieval ({name})", "",
                  "| task | Recall@1 | Recall@5 | chance@1 | R@1 / chance | simple-add R@1 |",
                  "|---|---|---|---|---|---|"]
        for task, m in r.get("tasks", {}).items():
            lines.append(f"| {task} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['chance@1']:.3f} | "
                         f"{m['recall@1'] / m['chance@1']:.1f}x | {m.get('simple_add_recall@1', float('nan')):.3f} |")
        lines.append("")
    lines += ["## Wall time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["wall_time_s"].items()]
    return "\n".join(lines) + "\n"


def write_report(plan: Plan, state: dict) -> dict:
    report = collect(plan, state)
    root = Path(plan.recipe.output_root)
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_markdown(report)
    (root / "report.md").write_text(text)
    print("\n" + text, flush=True)
    return report
