"""The `detection` phase: score checkpoints on referring detection (region answers) and compare them, paired.

    - name: detection
      type: detection
      config:
        data: "{data}/rl/heldout.jsonl"        # grounding prompts in RL form (below)
        checkpoints: [sft, rl]                # 'base' or earlier phases, as the `eval` phase names them
        prior_from: "{data}/rl/train.jsonl"   # also score the no-image prior: each class's median training box
        blind: true                           # also each checkpoint with its images taken out
        wrong_image: true                     # also each checkpoint with every image moved to another prompt

The prompts are RL-form grounding rows, the ones the `grounding` reward trains on (`fixtures.grounding` writes them
as `rl/*.jsonl`): open-answer `mcq` records whose `answer` is the target box JSON in the pixels the model answers in.
The data check (`patho-r1 run --dry-run`) therefore reads them as `mcq` rows; a row whose answer is not a box list
(a multiple choice's letter) fails when the phase starts, in one line naming the file, row and field.

Every number is `eval.detection`'s (generation and parsing by `evaluate_grounding`, P/R/F1@0.5, mean IoU and
pycocotools' AP by `score_detection`, the prior by `prior_items`, the paired tests by `paired_f1_test`); this module
adds the intervals (a percentile bootstrap over the prompts, `scipy.stats.bootstrap`: of the micro F1, resampling
each prompt's `[tp, n_pred, n_target]`, and of the mean IoU) and the tables.  It writes `OUTPUT_DIR/detection/`,
sealed (a temporary folder, its manifest, one rename):

    <label>.json                  a checkpoint's result, in `python -m patho_r1.eval.detection score`'s form (so its
                                  `compare` reads it): the report with its per-item numbers, and every response
    <label>.no_image.json, <label>.wrong_image.json, prior.json     the controls and the chance line
    summary.json / summary.md     one row per result: F1@0.5 and mean IoU with 95% intervals, P, R, AP, AP50, AP75,
                                  malformed answers, and per class
    paired.json                   consecutive checkpoints, and each checkpoint against the prior: per-item F1 and
                                  per-item mean IoU, b - a with a 95% paired bootstrap interval and permutation p

Not `OUTPUT_DIR/summary.json`: that name is the MCQ `eval` phase's, which the run report reads as accuracies.  The
run report shows this phase's tables (`launch.report`), the run console its F1 line (`detection_result`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator

from patho_r1.config import PhaseResult
from patho_r1.eval.phase import CheckpointsPhaseConfig

FOLDER = "detection"  # under OUTPUT_DIR
PRIOR = "prior"  # the prior's row and file name (a checkpoint may not take it)
CONTROLS = {"no_image": "no image", "wrong_image": "wrong image"}  # file suffix -> row name suffix
_LABEL = r"[A-Za-z0-9_-]+"  # a checkpoint label is a file stem (as a recipe's phase names are)


class DetectionPhaseConfig(CheckpointsPhaseConfig):
    """Score checkpoints on referring detection; their labels name files, so they are file stems."""

    data: str = Field(..., description="grounding prompts in RL form (JSONL of open-answer rows whose answer is the "
                      "target box JSON), e.g. a grounding world's rl/heldout.jsonl")
    prior_from: str | None = Field(None, description="training prompts (the same form): also score the no-image "
                                   "prior, each class's median training box, as a row and a paired baseline")
    blind: bool = Field(False, description="also score each checkpoint with its images taken out")
    wrong_image: bool = Field(False, description="also score each checkpoint with every image moved to another "
                              "prompt: a model that reads the image falls toward the prior")
    limit: int | None = Field(None, gt=0, description="score only the first N prompts")
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
    n_resamples: int = Field(10_000, ge=100, description="bootstrap and permutation resamples")

    @model_validator(mode="after")
    def _labels_are_file_stems(self):
        import re

        bad = next((label for label in self.checkpoints if label == PRIOR or not re.fullmatch(_LABEL, label)), None)
        if bad is not None:
            raise ValueError(f"checkpoints: label {bad!r} must be letters, digits, _ and - (a file name), not "
                             f"{PRIOR!r}")
        return self

    def input_paths(self) -> dict[str, str]:
        return {"data": self.data, **({"prior_from": self.prior_from} if self.prior_from else {})}


def box_prompts(path: str, limit: int | None = None, check_images: bool = True) -> list:
    """The RL-form grounding prompts of `path`; a row whose `answer` is not a box list is one DataError."""
    from patho_r1.data import load_records
    from patho_r1.errors import DataError
    from patho_r1.rewards.grounding import target_boxes

    records = load_records(path, "mcq", limit=limit, check_images=check_images)
    for row, record in enumerate(records, start=1):
        try:
            target_boxes(record.answer)
        except ValueError:
            raise DataError(path, row, "answer", f"{str(record.answer)[:60]!r} is not a box list; the detection "
                            "phase reads grounding prompts whose answer is the target boxes' JSON (a grounding "
                            "world's rl/*.jsonl)") from None
    return records


# ----------------------------------------------------------------------------------------------------------------------
# Intervals, rows and the paired tests
# ----------------------------------------------------------------------------------------------------------------------

def micro_f1_interval(counts, *, seed: int = 0, n_resamples: int = 10_000) -> list[float] | None:
    """The 95% percentile-bootstrap interval of the micro F1 (`2 sum tp / (sum n_pred + sum n_target)`) over items,
    each item's `[tp, n_pred, n_target]` resampled together.  None with fewer than two items, and where the micro F1
    of some resample is undefined (it holds no box, predicted or target: a handful of items, most of them
    negatives answered with no box; with a hundred items that does not happen)."""
    import warnings

    from scipy import stats

    c = np.asarray(counts, dtype=float).reshape(-1, 3)
    if len(c) < 2 or not (c[:, 1] + c[:, 2]).any():
        return None

    def micro_f1(tp, pred, target, axis=-1):
        with np.errstate(invalid="ignore", divide="ignore"):  # a resample of box-less items: undefined (nan)
            return 2 * tp.sum(axis=axis) / (pred.sum(axis=axis) + target.sum(axis=axis))

    with warnings.catch_warnings():  # a nan interval is answered None below (scipy's warning names BCa)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap((c[:, 0], c[:, 1], c[:, 2]), micro_f1, paired=True, n_resamples=n_resamples,
                              random_state=seed, method="percentile")
    lo, hi = res.confidence_interval
    return None if np.isnan(lo) or np.isnan(hi) else [float(lo), float(hi)]


def mean_interval(values, *, seed: int = 0, n_resamples: int = 10_000) -> list[float] | None:
    """The 95% percentile-bootstrap interval of a mean over items; None with fewer than two items."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, random_state=seed, method="percentile")
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def row_numbers(report: dict, *, seed: int = 0, n_resamples: int = 10_000) -> dict:
    """A result's row of the summary, from `score_detection`'s report: the overall numbers, their intervals, and
    the per-class numbers."""
    overall = report["overall"]
    keep = ("precision", "recall", "f1", "tp", "fp", "fn", "mean_iou", "AP", "AP50", "AP75")
    return {"n": report["n"], "malformed": report["malformed"], **{k: overall[k] for k in keep},
            "f1_ci95": micro_f1_interval(report["per_item_counts"], seed=seed, n_resamples=n_resamples),
            "mean_iou_ci95": mean_interval(report["per_item_iou"], seed=seed, n_resamples=n_resamples),
            "per_class": report["per_class"]}


def paired_tests(reports: dict[str, dict], pairs: list[tuple[str, str]], *, seed: int = 0,
                 n_resamples: int = 10_000) -> list[dict]:
    """`eval.detection.paired_f1_test` (a paired bootstrap of the mean difference and a sign-flip permutation
    test, for any per-item number) of each pair `(a, b)` of results on the same items: per-item F1@0.5 and per-item
    mean IoU, which moves before a box clears IoU 0.5."""
    from patho_r1.eval.detection import paired_f1_test

    tests = []
    for a, b in pairs:
        ra, rb = reports[a], reports[b]
        if ra["n"] < 2:  # a bootstrap needs two items
            continue
        tests.append({"from": a, "to": b, "n": ra["n"], **{
            metric: paired_f1_test(ra[f"per_item_{key}"], rb[f"per_item_{key}"], seed=seed, n_resamples=n_resamples)
            for metric, key in (("f1", "f1"), ("mean_iou", "iou"))}})
    return tests


# ----------------------------------------------------------------------------------------------------------------------
# Tables and the console line
# ----------------------------------------------------------------------------------------------------------------------

def _num(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _interval(ci, spec: str = ".2f") -> str:
    return "-" if not ci else f"{ci[0]:{spec}} to {ci[1]:{spec}}"


def markdown_lines(summary: dict[str, dict], paired: list[dict]) -> list[str]:
    """The phase's tables as Markdown lines (summary.md and the run report): one row per result, the paired tests,
    and each class's numbers per result."""
    lines = ["| result | n | F1@0.5 | 95% CI | precision | recall | mean IoU | 95% CI | AP | AP50 | AP75 | malformed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['n']} | {_num(r['f1'])} | {_interval(r['f1_ci95'])} | {_num(r['precision'])} | "
                     f"{_num(r['recall'])} | {_num(r['mean_iou'])} | {_interval(r['mean_iou_ci95'])} | "
                     f"{_num(r['AP'])} | {_num(r['AP50'])} | {_num(r['AP75'])} | {r['malformed']} |")
    lines.append("")
    if paired:
        lines += ["Paired tests on the same prompts: the mean of b - a per prompt, its 95% paired bootstrap interval "
                  "and the two-sided sign-flip permutation p:", "",
                  "| a | b | n | F1@0.5 b - a | 95% CI | p | mean IoU b - a | 95% CI | p |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in paired:
            f, i = p["f1"], p["mean_iou"]
            lines.append(f"| {p['from']} | {p['to']} | {p['n']} | {f['diff']:+.3f} | {_interval(f['ci95'], '+.3f')} "
                         f"| {f['p_value']:.2g} | {i['diff']:+.3f} | {_interval(i['ci95'], '+.3f')} | "
                         f"{i['p_value']:.2g} |")
        lines.append("")
    classes = sorted({c for r in summary.values() for c in r["per_class"]})
    if classes:
        lines += ["Per class (the class a prompt asks for; F1 micro over its prompts, AP by pycocotools):", "",
                  "| class | result | target boxes | F1@0.5 | precision | recall | AP | AP50 |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in classes:
            for name, r in summary.items():
                m = r["per_class"].get(c)
                if m is not None:
                    lines.append(f"| {c or '(none)'} | {name} | {m['tp'] + m['fn']} | {_num(m['f1'])} | "
                                 f"{_num(m['precision'])} | {_num(m['recall'])} | {_num(m.get('AP'))} | "
                                 f"{_num(m.get('AP50'))} |")
        lines.append("")
    return lines


def headline(summary: dict[str, dict]) -> str:
    """The run console's line: F1@0.5 and mean IoU of the prior and each checkpoint (the controls are in the
    report)."""
    rows = {name: r for name, r in summary.items() if r.get("role") in ("prior", "checkpoint")}
    return ("F1@0.5 " + " ".join(f"{name}={_num(r['f1'], '.2f')}" for name, r in rows.items()) + "  mean IoU "
            + " ".join(f"{name}={_num(r['mean_iou'], '.2f')}" for name, r in rows.items()))


def detection_result(out: Path, metrics: dict) -> str:
    """The phase table's `result` hook: `headline` of the phase's summary."""
    from patho_r1.data import read_json_file  # a file cut short: one line naming it

    path = Path(out) / FOLDER / "summary.json"
    return headline(read_json_file(path)) if path.is_file() else ""


# ----------------------------------------------------------------------------------------------------------------------
# The phase
# ----------------------------------------------------------------------------------------------------------------------

def _generator(path: str, cfg: DetectionPhaseConfig):
    from patho_r1.eval.generation import make_generator
    from patho_r1.models import load_backbone

    backbone = load_backbone(path, dtype=cfg.dtype, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    if not cfg.runs_on_cpu():
        backbone.model.to("cuda")
    return make_generator(backbone)


def check_pixel_budget(records: list, generator, data: str) -> None:
    """A prompt's answer is in the pixels of its image resized for the budget it records (`pixel_budget`, as the
    grounding world writes it); a checkpoint whose processor resizes to another grid answers in other pixels, and
    every box would be scored off by the ratio.  Refuse that in one line; prompts with no `pixel_budget` pass."""
    from patho_r1.errors import DataError
    from patho_r1.eval.detail_completion import budget_of

    seen = budget_of(getattr(generator, "processor", None))
    if seen is None:  # not an HF generator: nothing to compare
        return
    for row, record in enumerate(records, start=1):
        want = (record.model_extra or {}).get("pixel_budget")
        if want and (want.get("min_pixels"), want.get("max_pixels")) != (seen.min_pixels, seen.max_pixels):
            raise DataError(data, row, "pixel_budget", f"answers written for {want}, but the checkpoint's processor "
                            f"resizes to {seen.kwargs()}: set the phase's min_pixels/max_pixels to the rows' budget, "
                            "or write the prompts for the checkpoint's")


def _score_checkpoint(label: str, path: str, records: list, cfg: DetectionPhaseConfig) -> dict[str, dict]:
    """A checkpoint's results (and its controls'), by file stem, in the `score` command's form."""
    from patho_r1.eval.detection import evaluate_grounding
    from patho_r1.eval.generation import SamplingConfig
    from patho_r1.eval.phase import wrong_images

    generator = _generator(path, cfg)
    check_pixel_budget(records, generator, cfg.data)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
    runs = {label: (records, False)}
    if cfg.blind:
        runs[f"{label}.no_image"] = (records, True)
    if cfg.wrong_image:
        runs[f"{label}.wrong_image"] = (wrong_images(records, cfg.seed), False)
    results = {}
    for stem, (prompts, blind) in runs.items():
        report, responses = evaluate_grounding(generator, prompts, sampling, blind=blind)
        results[stem] = {"model": str(path), "data": cfg.data, "blind": blind,
                         "control": stem.partition(".")[2] or None, "report": report,
                         "responses": [{"id": r.id, "response": t} for r, t in zip(records, responses, strict=True)]}
    return results


def _row_name(stem: str) -> tuple[str, str]:
    """(row name, role) of a result file's stem: `rl.no_image` -> ('rl, no image', 'no_image')."""
    label, _, control = stem.partition(".")
    if stem == PRIOR:
        return PRIOR, PRIOR
    return (f"{label}, {CONTROLS[control]}", control) if control else (label, "checkpoint")


def run_detection(cfg: DetectionPhaseConfig) -> PhaseResult:
    """Score the prior (with `prior_from`) and each checkpoint (with its controls); write OUTPUT_DIR/detection/ and
    return `{"summary": {result: F1, its interval, mean IoU, AP, AP50}}` as the result's metrics."""
    from patho_r1.checkpoint import Manifest, lineage_digest, seal
    from patho_r1.eval.detection import prior_items, score_detection
    from patho_r1.training import wandb_run

    cfg.check_inputs()
    t0 = time.time()
    records = box_prompts(cfg.data, cfg.limit)
    results: dict[str, dict] = {}
    if cfg.prior_from:
        train = box_prompts(cfg.prior_from, check_images=False)
        results[PRIOR] = {"prior_from": cfg.prior_from, "data": cfg.data,
                          "report": score_detection(prior_items(train, records))}
    for label, path in cfg.checkpoints.items():
        results.update(_score_checkpoint(label, path, records, cfg))
    options = {"seed": cfg.seed, "n_resamples": cfg.n_resamples}
    summary = {}
    for stem, result in results.items():
        name, role = _row_name(stem)
        summary[name] = {"role": role, "file": f"{stem}.json", "checkpoint": result.get("model"),
                         **row_numbers(result["report"], **options)}
        r = summary[name]
        print(f"[detection] {name}: F1@0.5={_num(r['f1'])} (95% CI {_interval(r['f1_ci95'])}) "
              f"mean IoU={_num(r['mean_iou'])} AP={_num(r['AP'])} AP50={_num(r['AP50'])} "
              f"malformed {r['malformed']}/{r['n']}", flush=True)
    labels = list(cfg.checkpoints)
    pairs = list(zip(labels, labels[1:], strict=False)) + [(PRIOR, label) for label in labels if PRIOR in results]
    paired = paired_tests({_row_name(s)[0]: r["report"] for s, r in results.items()}, pairs, **options)

    def write(tmp: Path) -> None:
        for stem, result in results.items():
            (tmp / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "summary.md").write_text("\n".join(markdown_lines(summary, paired)))
        (tmp / "paired.json").write_text(json.dumps(paired, indent=2) + "\n")

    out = Path(cfg.output_dir)
    manifest = Manifest(phase="detection", parent=cfg.data, recipe_hash=cfg.recipe_hash,
                        parents={p: lineage_digest(p) for p in cfg.checkpoints.values()},
                        extra={"checkpoints": cfg.checkpoints, "prior_from": cfg.prior_from, "n": len(records),
                               "seconds": round(time.time() - t0, 2)})
    seal(out / FOLDER, manifest, write)
    headline_numbers = {name: {k: r[k] for k in ("f1", "f1_ci95", "mean_iou", "AP", "AP50")}
                        for name, r in summary.items()}
    with wandb_run(cfg, f"detection-{out.name}") as wandb_log:
        wandb_log(headline_numbers)
    return PhaseResult(model_dir=out, metrics={"summary": headline_numbers})
