"""The run report: held-out MCQ accuracy per checkpoint (with its 95% interval), composed-retrieval recall, wall time
per phase, and plots of every training phase.

Everything is read back from the run's own files (`run_state.json`, each phase's `metrics.jsonl`, the eval phase's
`summary.json`, the detection phase's `detection/summary.json`, the embed phase's `eval/metrics.json`), so
`patho-r1 report RUN_DIR` redraws any past run:

    RUN_DIR/report.md     tables, with the plots linked
    RUN_DIR/report.html   the same, plots inline (one file, no server)
    RUN_DIR/report.json   the numbers
    RUN_DIR/plots/*.png
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from patho_r1.data import iter_raw_rows, read_json_file
from patho_r1.errors import DataError
from patho_r1.eval.stats import wilson_interval
from patho_r1.launch import plots
from patho_r1.launch.context import RECIPE_AS_RUN

STATE_FILE = "run_state.json"


def read_json(path: Path):
    """A phase's JSON output; a file cut short (a copy interrupted mid-way) is one line naming it, not a traceback."""
    try:
        return read_json_file(path)
    except DataError as exc:
        raise DataError(exc.path, exc.row, exc.field, f"{exc.message}; the report was left as it was") from None


def read_jsonl(path: Path) -> list[dict]:
    """A phase's logged rows (none when it logged nothing); a bad line is a DataError naming file and line."""
    return [row for _, row in iter_raw_rows(path)] if path.is_file() else []


def collect(run_dir: str | Path) -> dict:
    """The report's numbers, and each training phase's logged rows (under `training`, for the plots)."""
    run_dir = Path(run_dir)
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{run_dir}: no {STATE_FILE}; is this a `patho-r1 run` output folder?")
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state.get("phases"), dict):
            raise ValueError("no phases")
    except (json.JSONDecodeError, AttributeError, ValueError) as exc:
        raise DataError(state_file, None, None, f"not a readable run state ({exc}); the report was left as it "
                        "was") from None
    report: dict = {"recipe": state.get("recipe", run_dir.name), "recipe_hash": state.get("recipe_hash"),
                    "context": state.get("context", {}), "phase_links": {},
                    "mcq": {}, "paired": [], "samples": {}, "retrieval": {}, "pathoclip": {}, "curate": {},
                    "embed_bench": {}, "detection": {},
                    "wall_time_s": {}, "training": {}}
    evals = [n for n, e in state["phases"].items() if (phase_dir(run_dir, n, e) / "summary.json").is_file()]
    for name, entry in state["phases"].items():
        out = phase_dir(run_dir, name, entry)
        report["wall_time_s"][name] = round(float(entry.get("seconds", 0.0)), 1)
        report["phase_links"][name] = {what: os.path.relpath(out / folder, run_dir) for what, folder in
                                       (("model", "model"), ("wandb", "wandb"), ("eval", ""),
                                        ("detection", "detection")) if
                                       (out / folder).is_dir() and (folder or (out / "summary.json").is_file())}
        rows = read_jsonl(out / "metrics.jsonl")
        if rows:
            report["training"][name] = {"type": entry.get("type"), "rows": rows}
        if (out / "summary.json").is_file():
            # two eval phases (a benchmark and the curated held-out set) score the same labels: name the phase
            prefix = f"{name}: " if len(evals) > 1 else ""
            for label, r in read_json(out / "summary.json").items():
                lo, hi = wilson_interval(round(r["accuracy"] * r["n"]), r["n"])
                report["mcq"][prefix + label] = {**r, "ci95": [lo, hi], "eval_phase": name}
            if (out / "paired.json").is_file():
                report["paired"] += [{**p, "from": prefix + p["from"], "to": prefix + p["to"]}
                                     for p in read_json(out / "paired.json")]
            if (out / "samples.json").is_file():
                report["samples"][name] = read_json(out / "samples.json")
        if (out / "eval" / "metrics.json").is_file():
            report["retrieval"][name] = read_json(out / "eval" / "metrics.json")
        if (out / "eval" / "comparison.json").is_file():  # a clip phase's evaluation
            report["pathoclip"][name] = {**read_json(out / "eval" / "comparison.json"),
                                         "plot": str(out / "eval" / "few_shot.png")}
        if (out / "bench" / "results.json").is_file():  # an embed_bench phase's suite (embed.bench_report)
            report["embed_bench"][name] = {**read_json(out / "bench" / "results.json"),
                                           "plot": str(out / "bench" / "results.png")}
        if (out / "detection" / "summary.json").is_file():  # a detection phase's results (eval.detection_phase)
            paired = out / "detection" / "paired.json"
            report["detection"][name] = {"summary": read_json(out / "detection" / "summary.json"),
                                         "paired": read_json(paired) if paired.is_file() else []}
        stages = curate_stages(out)
        if stages:
            report["curate"][name] = stages
    return report


def phase_dir(run_dir: Path, name: str, entry: dict) -> Path:
    """A phase's folder in *this* run folder: its recorded path relative to the run folder (as the runner writes it),
    else its own folder here, else (a phase that wrote outside the run folder) the absolute path it recorded.  An
    older state's absolute path inside a run that has since moved is never read: the copy's own files are."""
    recorded = entry.get("output_dir")
    if recorded and not Path(recorded).is_absolute():
        return run_dir / recorded
    if (run_dir / name).is_dir() or not recorded:
        return run_dir / name
    return Path(recorded)


def curate_stages(out: Path) -> list[dict]:
    """The manifests of a curate phase's stage folders (`NN-<stage>/manifest.json`), in order."""
    from patho_r1.curate.store import read_stage_manifest

    found = []
    for path in sorted(out.glob("[0-9][0-9]-*/manifest.json")) if out.is_dir() else []:
        manifest = read_stage_manifest(path.parent)
        found.append({"folder": path.parent.name, "stage": manifest.stage, "seconds": manifest.seconds,
                      "counts": manifest.counts, "config": manifest.config})
    return found


def stage_rows(counts: dict) -> int:
    """Rows a curate stage wrote: its kind files, or a generate stage's teacher replies."""
    return int(sum(counts.get("kinds", {}).values()) or counts.get("generations", 0))


def _curate_markdown(name: str, stages: list[dict]) -> list[str]:
    lines = [f"## Data engine ({name})", "", "| stage | rows out | rejected | removed | engine | rows/s | seconds |",
             "|---|---|---|---|---|---|---|"]
    for st in stages:
        c = st["counts"]
        rejected = c.get("rows.rejects", 0) or c.get("rows.rejected", 0)
        lines.append(f"| {st['folder']} | {stage_rows(c)} | {rejected} | "
                     f"{c.get('rows.removed', 0)} | {c.get('engine', '')} | {c.get('rows_per_s', 0):,.0f} | "
                     f"{st['seconds']:.1f} |")
    removed = [(st["folder"], reason, n) for st in stages for reason, n in st["counts"].get("removed", {}).items()]
    if removed:
        lines += ["", "What was removed, and why (each row is listed in the stage's removed.jsonl):", "",
                  "| stage | reason | rows |", "|---|---|---|"]
        lines += [f"| {folder} | {reason} | {n} |" for folder, reason, n in removed]
    for st in stages:
        c = st["counts"]
        if st["stage"] == "tag" and c.get("holdout"):
            h = c["holdout"]
            lines += ["", f"Subfield tagging: held-out accuracy {h['accuracy']:.3f} on {h['n']} hand labels "
                      f"({c.get('hand_labels', 0)} hand labels, {sum(c.get('weak_labels', {}).values())} keyword "
                      f"labels; {c.get('review', 0)} least confident rows in review.csv)", "",
                      "| subfield | precision | recall | support | rows tagged |", "|---|---|---|---|---|"]
            lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['support']} | "
                      f"{c.get('subfields', {}).get(k, 0)} |" for k, v in h["per_class"].items()]
        if st["stage"] == "cluster":
            ari = c.get("adjusted_rand_index")
            lines += ["", f"Difficulty levels (K-means per subfield, ordered by {c.get('criterion')})"
                      + (f"; adjusted Rand index against the hidden difficulty {ari:.3f}, levels agreeing "
                         f"{c.get('level_agreement', float('nan')):.3f}" if ari is not None else ""), "",
                      "| subfield | rows | silhouette | easy | medium | hard |", "|---|---|---|---|---|---|"]
            for sub, r in c.get("subfields", {}).items():
                levels = r.get("levels", {})
                cells = [f"{levels[lv]['size']} ({levels[lv].get(c.get('criterion'), 0):.3f})" if lv in levels
                         else "" for lv in ("easy", "medium", "hard")]
                lines.append(f"| {sub} | {r['rows']} | {r.get('silhouette', float('nan')):.3f} | "
                             + " | ".join(cells) + " |")
        if st["stage"] == "generate":
            lines += ["", f"Teacher ({st['config'].get('endpoint', {}).get('model')}): {c.get('answered', 0)} replies "
                      f"this run, {c.get('resumed', 0)} already there, {c.get('failed', 0)} failed; "
                      f"{c.get('prompt_tokens', 0):,} tokens in, {c.get('completion_tokens', 0):,} out; "
                      f"{c.get('finish_length', 0)} cut off at max_tokens. Tasks: {c.get('tasks', {})}"]
        if st["stage"] == "filter":
            lines += ["", f"Filters: {c.get('kept', 0)} kept, {c.get('rejected', 0)} rejected (a row may fail "
                      "several rules; per subfield with examples in the stage's filter_report.md)", "",
                      "| rule | rejected |", "|---|---|"]
            lines += [f"| {rule} | {n} |" for rule, n in c.get("rejected_by_rule", {}).items()]
        if st["stage"] == "mcq":
            b = c.get("no_image") or {}
            lines += ["", f"RL MCQs: {c.get('made', 0)} made of {c.get('asked', 0)} asked from a pool of "
                      f"{c.get('pool', 0)} captions apart from the SFT data ({c.get('excluded_sft_overlap', 0)} "
                      f"overlapping rows left out); {c.get('heldout', 0)} held out. Answer letters: "
                      f"{c.get('letters', {})}."]
            if b:
                lines += [f"Image-blind rules: commonest letter {b['commonest_letter']:.3f}, longest option "
                          f"{b['longest_option']:.3f}, option-text prior {b['option_text_prior']:.3f}; chance "
                          f"{b['chance']:.3f} (best {b['best_minus_chance_points']:+.1f} points)."]
    return lines + [""]


RETRIEVAL_CAPTION = ("composed retrieval, Recall@k per task (it2i: an image and a modifying text to an image; it2t: an "
                     "image and a question to its answer; mi2t: several images and a question to a text; v2t: video "
                     "frames to a text), beside the simple-add baseline (the query's image and text embeddings "
                     "added) and chance")


def draw(report: dict, plot_dir: Path) -> dict[str, Path]:
    """Every plot the run has data for, by caption."""
    drawn: dict[str, Path | None] = {}
    training = report["training"]
    for name, t in training.items():
        stages = "; each stage on its own axis (a stage restarts the step count)" if any(
            r.get("stage") for r in t["rows"]) else ""
        caption = (f"{name}: training loss (faint: the logged values; bold: their centred moving average; a log "
                   f"scale where the loss spans decades){stages}, and the learning rate, gradient norm, token entropy "
                   "and PPO clip ratios where the phase logs them")
        drawn[caption] = plots.phase_training(name, t["rows"], plot_dir / f"{name}_training.png")
    for name, t in training.items():
        if not any("reward" in r for r in t["rows"]):  # a phase that logs rewards: RL, by its rows
            continue
        rows = t["rows"]
        drawn[f"{name}: reward components and total"] = plots.rl_rewards(rows, plot_dir / f"{name}_rewards.png", name)
        drawn[f"{name}: completion length"] = plots.completion_length(rows, plot_dir / f"{name}_length.png", name)
        drawn[f"{name}: DAPO filtered fraction and rounds"] = plots.dynamic_sampling(
            rows, plot_dir / f"{name}_dynamic_sampling.png", name)
    drawn["held-out accuracy per checkpoint"] = plots.accuracy(report["mcq"], plot_dir / "accuracy.png")
    for label, r in report["mcq"].items():
        if r.get("classes"):
            slug = "".join(ch if ch.isalnum() else "_" for ch in label)
            drawn[f"{label}: confusion matrix (held-out MCQ)"] = plots.confusion(
                r["classes"]["confusion"], plot_dir / f"confusion_{slug}.png", f"{label}: gold class x answer")
    for name, r in report["pathoclip"].items():
        if Path(r["plot"]).is_file():
            drawn[f"{name}: PathoCLIP few-shot linear probe"] = Path(r["plot"])
    for name, r in report.get("embed_bench", {}).items():
        if Path(r["plot"]).is_file():
            drawn[f"{name}: embedding suite {r['suite']}, headline metric per task with its 95% interval"] = \
                Path(r["plot"])
    for name, r in report["retrieval"].items():
        drawn[f"{name}: {RETRIEVAL_CAPTION}"] = plots.retrieval(r.get("tasks", {}), plot_dir / f"{name}_retrieval.png",
                                                                 name)
    return {caption: path for caption, path in drawn.items() if path is not None}


def class_lines(mcq: dict, paired: list[dict] = ()) -> list[str]:
    """Per-class accuracy of each checkpoint scored on a classification set, its balanced accuracy, and every class
    that fell between consecutive checkpoints of one evaluation by more than their 95% intervals allow (the intervals
    do not overlap), with where its items went.  An overall gain can hide a class that collapses; this is the line
    that shows it."""
    tables = {label: r["classes"] for label, r in mcq.items() if r.get("classes")}
    if not tables:
        return []
    labels = list(tables)
    names = sorted({c for t in tables.values() for c in t["per_class"]})

    def cell(label: str, name: str) -> str:
        m = tables[label]["per_class"].get(name)
        return "-" if m is None else f"{m['accuracy']:.2f}"

    lines = ["Per class (accuracy by the eval's headline rule; the confusion matrices are in each checkpoint's "
             "results.md):", "", "| class | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(label, name) for label in labels) + " |" for name in names]
    lines += ["| balanced accuracy | " + " | ".join(f"{tables[label]['balanced_accuracy']:.3f}" for label in labels)
              + " |", ""]
    tests = {(p["from"], p["to"]): p.get("per_class", {}) for p in paired}
    steps = [(a, b) for a, b in zip(labels, labels[1:], strict=False) if tests.get((a, b))]
    if steps:
        lines += ["Per-class change between consecutive checkpoints, with McNemar's exact test on the class's own "
                  "items (items gained / lost, p):", "",
                  "| class | " + " | ".join(f"{a} → {b}" for a, b in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for name in names:
            cells = []
            for a, b in steps:
                old, new = tables[a]["per_class"].get(name), tables[b]["per_class"].get(name)
                t = tests[(a, b)].get(name)
                cells.append("-" if not (old and new and t) else f"{new['accuracy'] - old['accuracy']:+.2f} "
                             f"(+{t['gained']}/-{t['lost']}, p {t['p_value']:.2g})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    for before, after in zip(labels, labels[1:], strict=False):
        if mcq[before].get("eval_phase") != mcq[after].get("eval_phase"):
            continue  # the last checkpoint of one benchmark and the first of the next: different items
        for name in names:
            old, new = tables[before]["per_class"].get(name), tables[after]["per_class"].get(name)
            if old and new and new["ci95"][1] < old["ci95"][0]:
                t = tests.get((before, after), {}).get(name)
                p = f" (paired test on its items: p {t['p_value']:.2g})" if t else ""
                lines += [f"**{name} fell** from {old['accuracy']:.2f} ({before}) to {new['accuracy']:.2f} ({after}), "
                          f"beyond both 95% intervals{p}{_went_to(tables[after]['confusion'], name)}", ""]
    return lines


def _went_to(confusion: dict, name: str) -> str:
    """"; answered X on k of n": the commonest wrong answer for a gold class, from a confusion matrix."""
    row = confusion["matrix"][confusion["rows"].index(name)]
    wrong = [(n, col) for n, col in zip(row, confusion["columns"], strict=True) if col != name and n]
    if not wrong:
        return ""
    n, col = max(wrong)
    return f"; answered {col!r} on {n} of {sum(row)}"


SAMPLE_RESPONSE_CHARS = 600


def sample_lines(name: str, samples: list[dict]) -> list[str]:
    """Each sampled item: its thumbnail, question and options, the gold answer, and every checkpoint's response
    (reasoning and answer, as generated) with its verdict."""
    if not samples:
        return []
    lines = [f"## Sample generations ({name})", "", f"{len(samples)} held-out items chosen with a fixed seed, half of "
             "them among the last checkpoint's failures; the same items for every checkpoint.", ""]
    for item in samples:
        lines += [f"### {item['id']}", ""]
        if item.get("thumbnail"):
            lines += [f"![{item['id']}]({item['thumbnail']})", ""]
        lines += [_code(item["question"]), ""]
        lines += [f"- {letter}. {text}" for letter, text in item.get("options", {}).items()]
        lines += ["", f"Gold: **{item['answer']}**", ""]
        for label, r in item["responses"].items():
            verdict = {True: "right", False: "wrong"}.get(r["correct"], "not decided")
            text = r["response"] if len(r["response"]) <= SAMPLE_RESPONSE_CHARS else \
                r["response"][:SAMPLE_RESPONSE_CHARS] + " …"
            lines += [f"- **{label}** ({verdict}, read {r['prediction']!r}): {_code(text)}"]
        lines.append("")
    return lines


def _code(text: str) -> str:
    """Text as a Markdown code span, so that a model's `<think>` tags, asterisks and pipes show as written; the fence
    is one backtick longer than any run of backticks inside (CommonMark's rule)."""
    text = " ".join(text.split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}"


def context_lines(report: dict) -> list[str]:
    """What produced the numbers: the recipe, times, commit, versions, machine, and per phase its wall time,
    training speed (steps/s from its logged rows) and folders."""
    ctx = report.get("context") or {}
    lines = ["## Context", ""]
    if ctx:
        hw = ctx.get("hardware", {})
        gpus = ", ".join(hw.get("gpus", [])) or "no GPU"
        lines += [f"- recipe `{report['recipe']}` (hash `{report['recipe_hash']}`), as run: `{RECIPE_AS_RUN}`",
                  f"- started {ctx.get('started', '?')}, last phase finished {ctx.get('finished', '?')}",
                  f"- source commit `{ctx.get('commit') or 'not a git checkout'}`",
                  f"- driver: {hw.get('host', '?')}, {hw.get('cpus', '?')} CPUs, {gpus}; {hw.get('platform', '')}",
                  "- versions: " + ", ".join(f"{k} {v}" for k, v in ctx.get("versions", {}).items()), ""]
    lines += ["| phase | wall time (s) | steps/s | folders |", "|---|---|---|---|"]
    for name, seconds in report["wall_time_s"].items():
        rows = report.get("training", {}).get(name, {}).get("rows", [])
        steps = max((r.get("step", 0) for r in rows if isinstance(r.get("step"), (int, float))), default=0)
        rate = f"{steps / seconds:.2f}" if steps and seconds else "-"
        links = ", ".join(f"[{what}]({path})" for what, path in report.get("phase_links", {}).get(name, {}).items())
        lines.append(f"| {name} | {seconds:.1f} | {rate} | {links or '-'} |")
    total = sum(report["wall_time_s"].values())
    lines += ["", f"Total wall time of the phases: {total:.1f} s.", ""]
    return lines


def render_markdown(report: dict, figures: dict[str, Path] | None = None, root: Path | None = None) -> str:
    lines = [f"# patho-r1 run report: {report['recipe']}", "", f"recipe hash `{report['recipe_hash']}`", ""]
    if report["mcq"]:
        lines += ["## Held-out MCQ", "", *mcq_lines(report)]
    for name, samples in report.get("samples", {}).items():
        lines += sample_lines(name, samples)
    for name, r in report["retrieval"].items():
        lines += [f"## Composed retrieval ({name})", "",
                  "| task | Recall@1 | Recall@5 | chance@1 | R@1 / chance | simple-add R@1 |",
                  "|---|---|---|---|---|---|"]
        for task, m in r.get("tasks", {}).items():
            lines.append(f"| {task} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['chance@1']:.3f} | "
                         f"{m['recall@1'] / m['chance@1']:.1f}x | {m.get('simple_add_recall@1', float('nan')):.3f} |")
        lines.append("")
    for name, r in report.get("pathoclip", {}).items():
        from patho_r1.embed.clip_eval import comparison_markdown

        lines += [f"## PathoCLIP ({name})", "", comparison_markdown(r["results"])]
    for name, r in report.get("embed_bench", {}).items():
        from patho_r1.embed.bench_report import markdown as bench_markdown

        lines += [f"## Embedding suite ({name})", "", *bench_markdown(r).splitlines()[2:], ""]
    for name, r in report.get("detection", {}).items():
        from patho_r1.eval.detection_phase import markdown_lines as detection_lines

        lines += [f"## Referring detection ({name})", "", *detection_lines(r["summary"], r["paired"])]
    for name, stages in report.get("curate", {}).items():
        lines += _curate_markdown(name, stages)
    lines += context_lines(report)
    if figures:
        lines += ["", "## Plots", ""]
        for caption, path in figures.items():
            lines += [f"![{caption}]({Path(os.path.relpath(path, root)).as_posix() if root else path})", ""]
    return "\n".join(lines) + "\n"


def render_html(report: dict, figures: dict[str, Path]) -> str:
    """The report as one self-contained page that reads on a phone and a desktop: the Markdown rendered by
    markdown-it (CommonMark plus tables: every table's header a header, code and bold as such), each table in a box
    that scrolls sideways on its own, the plots inline as PNG data."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(render_markdown(report))
    body = body.replace("<table>", "<div class='scroll'><table>").replace("</table>", "</table></div>")
    for caption, path in figures.items():
        data = base64.b64encode(path.read_bytes()).decode()
        body += (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
                 f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em;line-height:1.4}"
             ".scroll{overflow-x:auto;max-width:100%;margin:1em 0}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;white-space:nowrap}th{background:#f3f3f3}"
             "img{max-width:100%;height:auto}figure{margin:1em 0}p,li{overflow-wrap:anywhere}"
             "code{background:#f3f3f3;padding:0 .2em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html.escape(report['recipe'])}</title><style>{style}</style></head><body>{body}</body></html>\n")


def phase_headline(out_dir: str | Path, metrics: dict, phase_type: str | None = None) -> str:
    """The few numbers of a finished phase worth a console line: its final training loss, then what its type's
    `result` hook (the phase table) reads from its output folder: the held-out accuracy of each checkpoint it
    scored, its composed-retrieval R@1, ...  `phase_type` defaults to the one its manifest names."""
    from patho_r1.launch.phases import PHASES

    out, parts = Path(out_dir), []
    if isinstance(metrics.get("train_loss"), (int, float)):
        parts.append(f"train_loss={metrics['train_loss']:.4g}")
    phase = PHASES.get(phase_type or _manifest_phase(out) or "")
    result = phase.hook("result") if phase else None
    if result is not None:
        parts.append(result(out, metrics))
    return "  ".join(p for p in parts if p)


def _manifest_phase(out: Path) -> str | None:
    """The phase type a phase folder's manifest names (its final model's, else its own)."""
    from patho_r1.checkpoint import read_manifest

    for folder in (out / "model", out):
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is not None and manifest.phase:
            return manifest.phase
    return None


# The phase table's `result` hooks: `(out_dir, metrics) -> str`, read from what each phase type writes.


def eval_result(out: Path, metrics: dict) -> str:
    """The held-out accuracy of each checkpoint an eval phase scored."""
    if not (out / "summary.json").is_file():
        return ""
    summary = read_json(out / "summary.json")
    return "accuracy " + " ".join(f"{label}={r['accuracy']:.2f}" for label, r in summary.items())


def embed_result(out: Path, metrics: dict) -> str:
    """The embedding head's composed-retrieval R@1 per task."""
    if not (out / "eval" / "metrics.json").is_file():
        return ""
    tasks = read_json(out / "eval" / "metrics.json").get("tasks", {})
    return "R@1 " + " ".join(f"{task}={m['recall@1']:.2f}" for task, m in tasks.items())


def clip_result(out: Path, metrics: dict) -> str:
    """PathoCLIP: each stage's loss (and stage II's drift from stage I), then its evaluation's mean recall and
    zero-shot accuracy per model."""
    parts = []
    for stage in ("stage1", "stage2"):  # the manifest's metrics
        if f"{stage}_last_loss" in metrics:
            drift = f" drift={metrics[f'{stage}_drift']:.3f}" if f"{stage}_drift" in metrics else ""
            parts.append(f"{stage} loss {metrics[f'{stage}_first_loss']:.2f}->{metrics[f'{stage}_last_loss']:.2f}"
                         f"{drift}")
    if (out / "eval" / "comparison.json").is_file():
        for label, m in read_json(out / "eval" / "comparison.json")["results"].items():
            r, z = m.get("retrieval", {}), m.get("zero_shot", {})
            parts.append(f"{label}: mean R={r.get('mean_recall', float('nan')):.2f} "
                         f"zero-shot={z.get('accuracy', float('nan')):.2f}")
    return "  ".join(parts)


def embed_bench_result(out: Path, metrics: dict) -> str:
    """The embedding suite: each model's mean headline (R@1, weighted F1) over its tasks."""
    from patho_r1.embed.bench_report import headline

    path = out / "bench" / "results.json"
    return headline(read_json(path)) if path.is_file() else ""


def curate_result(out: Path, metrics: dict) -> str:
    """The data engine: rows out of each stage, and the difficulty levels' agreement with a known truth."""
    stages = curate_stages(out)
    if not stages:
        return ""
    rows = [stage_rows(st["counts"]) for st in stages]
    parts = ["rows " + " -> ".join(f"{st['stage']} {n}" for st, n in zip(stages, rows, strict=True))]
    ari = next((st["counts"]["adjusted_rand_index"] for st in stages if "adjusted_rand_index" in st["counts"]), None)
    if ari is not None:
        parts.append(f"difficulty ARI={ari:.2f}")
    return "  ".join(parts)


def mcq_lines(report: dict) -> list[str]:
    """The held-out MCQ section's body, as Markdown lines: accuracy per checkpoint, the paired comparison of
    consecutive checkpoints and the per-class table (the run console prints it when a run ends)."""
    if not report["mcq"]:
        return []
    lines = ["| checkpoint | n | accuracy | 95% CI | wrong-image control | strict accuracy | format rate | image-blind "
             "chance |", "|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for label, r in report["mcq"].items():
        lo, hi = r.get("ci95", (nan, nan))
        lines.append(f"| {label} | {r.get('n', '')} | {r['accuracy']:.3f} | {lo:.2f}-{hi:.2f} | "
                     f"{r.get('wrong_image_accuracy', nan):.3f} | {r['strict_accuracy']:.3f} | "
                     f"{r['format_rate']:.3f} | {r['chance']:.3f} |")
    lines.append("")
    if report.get("paired"):
        lines += ["Paired comparison of consecutive checkpoints on the same items (McNemar's exact test):", "",
                  "| from | to | items gained | items lost | p |", "|---|---|---|---|---|"]
        lines += [f"| {p['from']} | {p['to']} | {p['gained']} | {p['lost']} | {p['p_value']:.2g} |"
                  for p in report["paired"]]
        lines.append("")
    return lines + class_lines(report["mcq"], report.get("paired", []))


def write_report(run_dir: str | Path) -> dict:
    """Collect, draw and write report.json, report.md, report.html and plots/ into the run folder; returns the
    numbers.  Everything is drawn and written in a staging folder inside the run folder first and moved into place
    only when complete, so a run that cannot be reported (a damaged state or metrics file) keeps its old report
    byte for byte."""
    root = Path(run_dir).resolve()
    report = collect(root)
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=root))
    try:
        figures = draw(report, staging / "plots")
        # the links report.md will follow once plots/ is in place (phase figures stay where their phase wrote them)
        placed = {caption: root / "plots" / path.relative_to(staging / "plots") if path.is_relative_to(staging)
                  else path for caption, path in figures.items()}
        numbers = {k: v for k, v in report.items() if k not in ("training", "samples")}  # rows and pictures
        (staging / "report.json").write_text(json.dumps(numbers, indent=2) + "\n")
        (staging / "report.md").write_text(render_markdown(report, placed, root))
        (staging / "report.html").write_text(render_html(report, figures))
        if (root / "plots").exists():
            (root / "plots").rename(staging / "plots.previous")
        if (staging / "plots").exists():
            (staging / "plots").rename(root / "plots")
        for name in ("report.json", "report.md", "report.html"):
            os.replace(staging / name, root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return numbers
