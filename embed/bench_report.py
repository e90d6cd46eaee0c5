"""The embedding suite's outputs: `results.json`, `results.md`, `results.png` and `selection.json` in one folder,
written atomically with a manifest (`patho_r1.checkpoint.seal`); and the Markdown the console and the run report
show.  Headline per task and direction: Recall@1 for retrieval and composed retrieval, weighted F1 for
classification, each with its 95% interval and chance."""

from __future__ import annotations

import json
from pathlib import Path

HEADLINE = {"i2t": "R@1", "t2i": "R@1", "it2t": "R@1", "classification": "weighted_f1"}
DIRECTION_NAMES = {"i2t": "image->text", "t2i": "text->image", "it2t": "image+question->answer",
                   "classification": "zero-shot"}


def _cell(m: dict, key: str) -> str:
    lo, hi = m.get(f"{key}_ci", (float("nan"), float("nan")))
    return f"{m[key]:.3f} ({lo:.2f}-{hi:.2f})"


def markdown(results: dict) -> str:
    """Three tables (retrieval, composed, classification), rows task x model, then notes on skipped tasks and
    dropped rows."""
    lines = [f"# Embedding suite `{results['suite']}` (seed {results['seed']})", ""]
    tasks = results["tasks"]
    by_meta = {meta: {n: t for n, t in tasks.items() if t["meta"] == meta}
               for meta in ("retrieval", "composed", "classification")}
    if by_meta["retrieval"]:
        lines += ["## Retrieval (Recall@K, 95% interval)", "",
                  "| task | model | i->t R@1 | i->t R@5 | i->t R@10 | t->i R@1 | t->i R@5 | t->i R@10 | chance R@1 "
                  "(i->t / t->i) | n |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, t in by_meta["retrieval"].items():
            for model, r in t["results"].items():
                a, b = r["i2t"], r["t2i"]
                lines.append(f"| {name} | {model} | {_cell(a, 'R@1')} | {a['R@5']:.3f} | {a['R@10']:.3f} | "
                             f"{_cell(b, 'R@1')} | {b['R@5']:.3f} | {b['R@10']:.3f} | {a['R@1_chance']:.3f} / "
                             f"{b['R@1_chance']:.3f} | {t['n_items']} |")
        lines.append("")
    if by_meta["composed"]:
        lines += ["## Composed retrieval (image + question -> answer)", "",
                  "| task | model | R@1 | R@5 | R@10 | chance R@1 | n |", "|---|---|---|---|---|---|---|"]
        for name, t in by_meta["composed"].items():
            for model, r in t["results"].items():
                m = r["it2t"]
                lines.append(f"| {name} | {model} | {_cell(m, 'R@1')} | {_cell(m, 'R@5')} | {_cell(m, 'R@10')} | "
                             f"{m['R@1_chance']:.3f} | {t['n_items']} |")
        lines.append("")
    if by_meta["classification"]:
        lines += ["## Zero-shot classification", "",
                  "| task | model | weighted F1 | accuracy | balanced accuracy | chance (wF1 / acc) | classes | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in by_meta["classification"].items():
            for model, r in t["results"].items():
                m = r["classification"]
                lines.append(f"| {name} | {model} | {_cell(m, 'weighted_f1')} | {_cell(m, 'accuracy')} | "
                             f"{_cell(m, 'balanced_accuracy')} | {m['weighted_f1_chance']:.3f} / "
                             f"{m['accuracy_chance']:.3f} | {m['n_classes']} | {t['n_items']} |")
        lines.append("")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {why}")
    for name, t in tasks.items():
        if t["n_dropped"]:
            lines.append(f"- {name}: {t['n_dropped']} of {t['n_read']} rows dropped (first: {t['dropped'][0]})")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path: Path) -> Path:
    """One bar group per task and direction, one bar per model (its headline metric with the 95% interval), chance
    as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [(name, d) for name, t in results["tasks"].items() for d in next(iter(t["results"].values()), {})]
    models = list(dict.fromkeys(m for t in results["tasks"].values() for m in t["results"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2))
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        xs, ys, errs = [], [], [[], []]
        for i, (name, d) in enumerate(groups):
            m = results["tasks"][name]["results"].get(model, {}).get(d)
            if m is None:
                continue
            key = HEADLINE[d]
            lo, hi = m[f"{key}_ci"]
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(m[key])
            errs[0].append(max(m[key] - lo, 0))
            errs[1].append(max(hi - m[key], 0))
        ax.bar(xs, ys, width, yerr=np.array(errs), label=model, capsize=2)
    for i, (name, d) in enumerate(groups):
        first = next(iter(results["tasks"][name]["results"].values()))[d]
        ax.hlines(first[f"{HEADLINE[d]}_chance"], i - 0.42, i + 0.42, colors="black", linewidth=1)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{n}\n{DIRECTION_NAMES[d]}" for n, d in groups], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("R@1 (retrieval) / weighted F1 (classification)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{results['suite']}: headline metric per task, 95% interval; black line: chance")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the axes, never over a bar
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(out: str | Path, results: dict) -> Path:
    """The results folder, replaced whole in one rename, with its manifest."""
    from patho_r1.checkpoint import Manifest, seal

    selection = results.get("selection", {})
    numbers = {k: v for k, v in results.items() if k != "selection"}

    def write(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(numbers, indent=2) + "\n")
        (tmp / "selection.json").write_text(json.dumps({"seed": results["seed"], "tasks": selection}, indent=1)
                                            + "\n")
        (tmp / "results.md").write_text(markdown(results))
        plot(results, tmp / "results.png")

    manifest = Manifest(phase="embed_bench", parent=results["data"],
                        extra={"suite": results["suite"], "seed": results["seed"], "models": results["models"]})
    return seal(out, manifest, write)


def headline(results: dict) -> str:
    """One console line: each model's mean headline over the task-directions it was scored on (the composed
    baselines' rows cover the composed tasks only, so their means are not comparable with the models' own)."""
    sums: dict[str, list[float]] = {}
    for t in results["tasks"].values():
        for model, r in t["results"].items():
            sums.setdefault(model, []).extend(m[HEADLINE[d]] for d, m in r.items())
    return "  ".join(f"{model}: mean headline {sum(v) / len(v):.3f} over {len(v)} task-directions"
                     for model, v in sums.items() if v)
