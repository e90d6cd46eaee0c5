"""The report's plots, drawn with matplotlib from a run's own files, so any past run can be redrawn.

Each function takes the data it draws (rows of a phase's `metrics.jsonl`, an eval summary, an embed evaluation) and
writes one PNG; it returns the path, or None when there is nothing to draw.  Nothing here knows about Ray or recipes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no display backend

DPI = 110


def _figure(width: float, height: float):
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _step_plot(ax, ylabel: str, title: str) -> None:
    """Axis labels, title and legend of a metric-over-steps plot."""
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if _number(r.get(key)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


@dataclass(frozen=True)
class Panel:
    """One axis of a phase's training figure: a logged key (of one stage, for phases that train in stages)."""

    title: str
    key: str
    stage: str | None
    log: bool  # a log y-axis: the series spans more than a decade, so a linear axis would flatten its tail


# Keys drawn beside the loss when a phase logs them, with their panel titles.  RL's clip ratios are the shares of
# tokens whose importance ratio the PPO clip cut (low, high) or that fell outside the trust region.
TRAINING_KEYS = {"learning_rate": "learning rate", "grad_norm": "gradient norm", "entropy": "token entropy",
                 "clip_ratio/region_mean": "clip ratio (outside the region)", "clip_ratio/low_mean": "clip ratio (low)",
                 "clip_ratio/high_mean": "clip ratio (high)"}


def training_panels(rows: list[dict]) -> list[Panel]:
    """The panels a phase's logged rows fill: the loss, then every other training key that holds a number somewhere;
    a phase that trains in stages gets each on its own axes per stage (a stage restarts its step counter)."""
    stages = list(dict.fromkeys(r.get("stage") for r in rows if "step" in r)) or [None]
    panels = []
    for key, title in {"loss": "loss", **TRAINING_KEYS}.items():
        for stage in stages:
            _, ys = _series([r for r in rows if r.get("stage") == stage], key)
            if ys and (key == "loss" or any(ys)):
                # a learning rate stays linear: its schedule is read in its own units
                panels.append(Panel(f"{title} ({stage})" if stage else title, key, stage,
                                    key != "learning_rate" and _spans_decades(ys)))
    return panels


def smoothed(values: list[float], window: int | None = None, log: bool = False) -> list[float]:
    """A centred moving average (no lag, unlike an exponential one: a falling loss is drawn where it is), over
    `window` points (default: a tenth of the series, odd); on a log axis, of the logarithms (a geometric mean), so
    that one spike does not lift a decade of the curve."""
    window = window or max(1, len(values) // 10)
    half = window // 2
    points = [math.log(v) for v in values] if log else list(values)
    out = []
    for i in range(len(points)):
        part = points[max(0, i - half): i + half + 1]
        mean = sum(part) / len(part)
        out.append(math.exp(mean) if log else mean)
    return out


def phase_training(name: str, rows: list[dict], path: Path) -> Path | None:
    """One figure per training phase, two panels a row: each stage's loss (faint: the logged values; bold: their
    moving average; log scale where the loss spans decades), then learning rate, gradient norm, entropy and clip
    ratios where logged.  The legend sits under the panels, off the data."""
    panels = training_panels(rows)
    if not panels:
        return None
    ncols = 1 if len(panels) == 1 else 2
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.8 * ncols, 2.6 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        xs, ys = _series([r for r in rows if r.get("stage") == panel.stage], panel.key)
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="logged")
        ax.plot(xs, smoothed(ys, log=panel.log), color="tab:blue", linewidth=2, label="moving average")
        if panel.log:
            ax.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.suptitle(f"{name}: training", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=DPI)
    return path


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 2 and max(positive) / min(positive) > 10


def rl_rewards(rows: list[dict], path: Path, title: str = "rl") -> Path | None:
    """Each reward's batch mean and the weighted total (`reward`) over RL steps."""
    keys = sorted({k for r in rows for k in r if k.startswith("rewards/") and k.endswith("/mean")})
    if not keys and not any("reward" in r for r in rows):
        return None
    fig, ax = _figure(6, 3.4)
    for key in keys:
        ax.plot(*_series(rows, key), marker=".", label=key.removeprefix("rewards/").removesuffix("/mean"))
    ax.plot(*_series(rows, "reward"), marker="o", color="black", linewidth=2, label="total (weighted)")
    _step_plot(ax, "reward", f"{title}: rewards")
    return _save(fig, path)


def completion_length(rows: list[dict], path: Path, title: str = "rl") -> Path | None:
    xs, mean = _series(rows, "completions/mean_length")
    if not xs:
        return None
    fig, ax = _figure(6, 3.0)
    ax.plot(xs, mean, marker=".", label="mean")
    for key, style in (("completions/min_length", ":"), ("completions/max_length", "--")):
        ax.plot(*_series(rows, key), linestyle=style, label=key.split("/")[1].replace("_length", ""))
    _step_plot(ax, "tokens", f"{title}: completion length")
    return _save(fig, path)


def dynamic_sampling(rows: list[dict], path: Path, title: str = "rl") -> Path | None:
    """DAPO dynamic sampling: the share of generated groups filtered out and the generation rounds per batch."""
    xs, frac = _series(rows, "dynamic_sampling/filtered_frac")
    if not xs:
        return None
    fig, ax = _figure(6, 3.0)
    ax.plot(xs, frac, marker=".", color="tab:red", label="filtered fraction")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("filtered fraction", color="tab:red")
    twin = ax.twinx()
    twin.step(*_series(rows, "dynamic_sampling/rounds"), where="mid", color="tab:blue", label="rounds")
    twin.set_ylabel("generation rounds", color="tab:blue")
    ax.set_title(f"{title}: DAPO dynamic sampling")
    return _save(fig, path)


def accuracy(summary: dict[str, dict], path: Path) -> Path | None:
    """Held-out MCQ accuracy per checkpoint with its 95% Wilson interval (`ci95`, as the report computed it), beside
    the wrong-image control (the same items with the images shuffled), and the image-blind chance line."""
    if not summary:
        return None
    labels = list(summary)
    acc = [summary[k]["accuracy"] for k in labels]
    intervals = [summary[k]["ci95"] for k in labels]
    low = [a - lo for a, (lo, _) in zip(acc, intervals, strict=True)]
    high = [hi - a for a, (_, hi) in zip(acc, intervals, strict=True)]
    fig, ax = _figure(1.4 * len(labels) + 2, 3.2)
    x = list(range(len(labels)))
    control = [summary[k].get("wrong_image_accuracy") for k in labels]
    width = 0.4 if any(c is not None for c in control) else 0.8
    ax.bar([i - width / 2 if width < 0.8 else i for i in x], acc, width, yerr=[low, high], capsize=4,
           color="tab:green", label="accuracy (95% CI)")
    if width < 0.8:
        ax.bar([i + width / 2 for i in x], [c or 0.0 for c in control], width, color="tab:orange",
               label="wrong-image control")
    ax.set_xticks(x, labels)
    chance = max(summary[k].get("chance", 0.0) for k in labels)
    ax.axhline(chance, color="grey", linestyle="--", label=f"image-blind chance ({chance:.2f})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"held-out MCQ (n={summary[labels[0]]['n']})")
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def confusion(table: dict, path: Path, title: str) -> Path | None:
    """A checkpoint's confusion matrix on a classification set (`rows`: gold classes, `columns`: the option answered,
    `(none)` for no option read), each row as shares of its gold class, the counts written in the cells."""
    rows, columns, matrix = table.get("rows"), table.get("columns"), table.get("matrix")
    if not rows or not matrix:
        return None
    shares = [[n / max(sum(row), 1) for n in row] for row in matrix]
    fig, ax = _figure(1.0 * len(columns) + 3, 0.55 * len(rows) + 2)
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("answered")
    ax.set_ylabel("gold class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the gold class")
    return _save(fig, path)


def retrieval(tasks: dict[str, dict], path: Path, title: str = "embed") -> Path | None:
    """Recall@1/5/10 per composed-retrieval task, beside the simple-add baseline's R@1 and chance."""
    if not tasks:
        return None
    names = list(tasks)
    ks = [k for k in ("recall@1", "recall@5", "recall@10") if all(k in tasks[t] for t in names)]
    width = 0.8 / (len(ks) + 1)
    fig, ax = _figure(1.6 * len(names) + 2, 3.4)
    for i, k in enumerate(ks):
        ax.bar([x + i * width for x in range(len(names))], [tasks[t][k] for t in names], width, label=k)
    base = [tasks[t].get("simple_add_recall@1", 0.0) for t in names]
    ax.bar([x + len(ks) * width for x in range(len(names))], base, width, color="lightgrey",
           label="simple-add R@1")
    ax.scatter([x + 0.4 - width / 2 for x in range(len(names))], [tasks[t]["chance@1"] for t in names],
               marker="_", s=400, color="black", label="chance@1", zorder=3)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("recall")
    ax.set_title(f"{title}: composed retrieval")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
