"""Referring-detection scores: precision, recall and F1 at IoU 0.5, and COCO-style AP, overall and per class.

An item is one referring question: its target boxes (`{"bbox": [x1, y1, x2, y2], "label": ...}`) and the boxes a
model answered (`rewards.grounding.parse_boxes` of its response; None when the answer did not parse, scored as no
boxes in the micro counts and AP, as 0 in the per-item numbers as the reward scores it, and counted in
`malformed`), all in the same pixels.

* **P/R/F1 @ IoU 0.5**: each item's boxes are paired one-to-one by the grounding reward's Hungarian matching
  (`rewards.grounding.match_boxes`); pairs at IoU >= 0.5 are true positives, unpaired predictions false positives,
  unpaired targets false negatives, summed over the items (micro).  `per_item_f1` (both empty: 1.0) is the number a
  paired test between two checkpoints compares; `per_item_counts` (`[tp, n_pred, n_target]`) is what an interval
  on the micro F1 resamples (the `detection` phase's).  `mean_iou`: the mean over items of the reward's matched IoU
  (paired IoUs over max(n_pred, n_target); both empty 1.0), which moves before a box clears IoU 0.5.
* **AP**: pycocotools' `COCOeval` (bbox), never a hand-written AP: `AP` is COCO's AP@[.5:.95], `AP50` and `AP75`
  at one threshold, each the 101-point interpolated area under precision/recall: `COCOeval.stats[:3]`
  (cocodataset/cocoapi@8c9bcc3cf640524c4c20a9c40e89cb6a2f2fa0e9, PythonAPI/pycocotools/cocoeval.py `accumulate`,
  `_summarize`; the per-class numbers slice its `precision` array as `_summarize` does).  Each item is its own
  COCO image; its category is the referred class (the item's `label`), since a referring answer is about the class
  the question names.  A generated answer has no confidence, so a box's score falls with its place in the answer
  (first = surest): AP then ranks the boxes a model lists first above those it adds later.  A class with no target
  box has no AP (None).

`python -m patho_r1.eval.detection score --model DIR --data rl/heldout.jsonl --out sft.json` scores a checkpoint
(`--blind`: the same prompts without their images), `... prior --train rl/train.jsonl --data rl/heldout.jsonl --out
prior.json` the no-image chance line (each class's median training box), `... compare sft.json rl.json` tests two
results, paired.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patho_r1.rewards.grounding import Box, match_boxes

IOU = 0.5


@dataclass
class DetectionItem:
    label: str  # the referred class (the record's `category`)
    targets: list[Box]
    predictions: list[Box] | None  # None: the answer did not parse
    image_size: tuple[int, int] | None = None


def _prf(tp: int, n_pred: int, n_target: int) -> dict:
    precision = tp / n_pred if n_pred else None
    recall = tp / n_target if n_target else None
    f1 = 2 * tp / (n_pred + n_target) if n_pred + n_target else None
    return {"tp": tp, "fp": n_pred - tp, "fn": n_target - tp, "precision": precision, "recall": recall, "f1": f1}


def _coco(items: Sequence[DetectionItem]) -> tuple[dict, list[dict], list[str]]:
    classes = sorted({it.label for it in items})
    cat = {name: i + 1 for i, name in enumerate(classes)}
    images, anns, dets = [], [], []
    for n, it in enumerate(items, start=1):
        w, h = it.image_size or (10**6, 10**6)
        images.append({"id": n, "width": w, "height": h})
        for box in it.targets:
            x1, y1, x2, y2 = box.bbox
            anns.append({"id": len(anns) + 1, "image_id": n, "category_id": cat[it.label], "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for rank, box in enumerate(it.predictions or []):
            x1, y1, x2, y2 = box.bbox
            dets.append({"image_id": n, "category_id": cat[it.label], "score": 1.0 / (1 + rank),
                         "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)]})
    gt = {"images": images, "annotations": anns, "categories": [{"id": i, "name": c} for c, i in cat.items()]}
    return gt, dets, classes


def _ap(precision: np.ndarray) -> float | None:
    """COCO's summary of a slice of `eval['precision']`: the mean over its defined (> -1) entries."""
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else None


def coco_ap(items: Sequence[DetectionItem]) -> dict:
    """AP, AP50, AP75 overall and AP, AP50 per class, by pycocotools (its printing silenced)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, dets, classes = _coco(items)
    if not gt_dict["annotations"]:
        return {"AP": None, "AP50": None, "AP75": None, "per_class": {c: {"AP": None, "AP50": None} for c in classes}}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets) if dets else COCO()  # loadRes refuses an empty list
        if not dets:
            dt.dataset = {"images": gt_dict["images"], "annotations": [], "categories": gt_dict["categories"]}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # per class, as `_summarize` slices precision: [threshold T, recall R, class K, area A (0 = all), max dets M
    # (-1 = 100)], the mean of its defined entries
    p = ev.eval["precision"][:, :, :, 0, -1]
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    per_class = {c: {"AP": _ap(p[:, :, k]), "AP50": _ap(p[t50, :, k])} for k, c in enumerate(classes)}
    ap, ap50, ap75 = (None if v < 0 else float(v) for v in ev.stats[:3])  # COCO's summary; -1: nothing to score
    return {"AP": ap, "AP50": ap50, "AP75": ap75, "per_class": per_class}


def score_detection(items: Sequence[DetectionItem], iou_threshold: float = IOU) -> dict:
    """Every number of the module docstring, overall and per class."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_item_f1, per_item_iou, per_item_counts = [], [], []
    for it in items:
        preds = it.predictions or []
        m = match_boxes(preds, it.targets, iou_threshold=iou_threshold)
        malformed = it.predictions is None  # as the reward scores it: 0, even where the target is empty
        per_item_f1.append(0.0 if malformed else m.f1)
        per_item_iou.append(0.0 if malformed else m.mean_iou)
        per_item_counts.append([m.true_positives, len(preds), len(it.targets)])  # what a micro-F1 interval resamples
        for key in ("__all__", it.label):
            totals[key][0] += m.true_positives
            totals[key][1] += len(preds)
            totals[key][2] += len(it.targets)
    ap = coco_ap(items)
    overall = {**_prf(*totals.pop("__all__", [0, 0, 0])), "AP": ap["AP"], "AP50": ap["AP50"], "AP75": ap["AP75"],
               "mean_iou": float(np.mean(per_item_iou)) if items else None}
    per_class = {c: {**_prf(*totals[c]), **ap["per_class"].get(c, {})} for c in sorted(totals)}
    return {"n": len(items), "malformed": sum(it.predictions is None for it in items), "iou_threshold": iou_threshold,
            "overall": overall, "per_class": per_class, "per_item_f1": per_item_f1, "per_item_iou": per_item_iou,
            "per_item_counts": per_item_counts}


# ----------------------------------------------------------------------------------------------------------------------
# A checkpoint on grounding prompts, and two of them compared
# ----------------------------------------------------------------------------------------------------------------------

def detection_items(records: Sequence, responses: Sequence[str | None]) -> list[DetectionItem]:
    """RL-form grounding prompts (open-answer `mcq` records whose `answer` is the target box JSON, in the pixels the
    model answers in) and the model's responses, as items."""
    from patho_r1.rewards.grounding import parse_boxes, target_boxes
    from patho_r1.rewards.parsing import completion_text

    return [DetectionItem(rec.category or "", target_boxes(rec.answer),
                          None if resp is None else parse_boxes(completion_text(resp)))
            for rec, resp in zip(records, responses, strict=True)]


def evaluate_grounding(generator, records: Sequence, sampling, *, system_prompt: str | None = None,
                       blind: bool = False) -> tuple[dict, list[str]]:
    """Generate an answer for each prompt and score them.  `blind`: the same prompts with their images taken out
    (the no-image baseline: what the question and the answer format alone get)."""
    from patho_r1.eval.mcq import build_request
    from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT

    prompt = REASONING_SYSTEM_PROMPT if system_prompt is None else system_prompt
    requests = [build_request(r.model_copy(update={"images": []}) if blind else r, prompt) for r in records]
    responses = generator.generate(requests, sampling)
    return score_detection(detection_items(records, responses)), responses


def prior_items(train: Sequence, records: Sequence) -> list[DetectionItem]:
    """The no-image chance line: each prompt answered with its class's coordinate-wise median target box in `train`
    (RL-form rows, the same pixels), never looking at the image; no box for a class `train` never locates."""
    from patho_r1.rewards.grounding import target_boxes

    by_class: dict[str, list] = defaultdict(list)
    for rec in train:
        by_class[rec.category or ""] += [b.bbox for b in target_boxes(rec.answer)]
    prior = {c: [Box(tuple(float(v) for v in np.median(np.array(boxes), axis=0)))] for c, boxes in by_class.items()
             if boxes}
    return [DetectionItem(rec.category or "", target_boxes(rec.answer), prior.get(rec.category or "", []))
            for rec in records]


def paired_f1_test(a: Sequence[float], b: Sequence[float], *, seed: int = 0, n_resamples: int = 10_000) -> dict:
    """Per-item F1 of two runs on the same items: the mean difference b - a, its 95% paired-bootstrap interval, and
    the two-sided sign-flip permutation p-value (`scipy.stats.permutation_test`, paired samples)."""
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError(f"paired test needs the same items on both sides, got {len(a)} and {len(b)}")
    x, y = np.asarray(a, float), np.asarray(b, float)

    def mean_diff(u, v, axis=-1):
        return np.mean(v - u, axis=axis)

    perm = stats.permutation_test((x, y), mean_diff, permutation_type="samples", n_resamples=n_resamples,
                                  alternative="two-sided", random_state=seed)
    boot = stats.bootstrap((x, y), mean_diff, paired=True, n_resamples=n_resamples, random_state=seed,
                           method="percentile")
    return {"n": len(x), "mean_a": float(x.mean()), "mean_b": float(y.mean()), "diff": float((y - x).mean()),
            "ci95": [float(boot.confidence_interval.low), float(boot.confidence_interval.high)],
            "p_value": float(perm.pvalue)}


def _write_json(path, data) -> None:
    import json
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m patho_r1.eval.detection score --model DIR --data rl/heldout.jsonl --out results.json [--blind]`
    and `... compare A.json B.json`: the paired test of two results on the same prompts."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m patho_r1.eval.detection")
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="generate and score a checkpoint on grounding prompts")
    score.add_argument("--model", required=True)
    score.add_argument("--data", required=True, help="RL-form grounding prompts (JSONL of open-answer mcq rows)")
    score.add_argument("--out", required=True)
    score.add_argument("--blind", action="store_true", help="take the images out (the no-image baseline)")
    score.add_argument("--limit", type=int)
    score.add_argument("--max-new-tokens", type=int, default=128)
    score.add_argument("--batch-size", type=int, default=16)
    prior = sub.add_parser("prior", help="score the no-image chance line: each class's median training box")
    prior.add_argument("--train", required=True)
    prior.add_argument("--data", required=True)
    prior.add_argument("--out", required=True)
    compare = sub.add_parser("compare", help="paired test of per-item F1 between two `score` results")
    compare.add_argument("a")
    compare.add_argument("b")
    args = parser.parse_args(argv)
    if args.command == "compare":
        from pathlib import Path

        from patho_r1.errors import DataError

        missing = next((p for p in (args.a, args.b) if not Path(p).is_file()), None)
        if missing:
            raise SystemExit(f"error: {DataError(missing, None, None, 'not found (a `score` result)')}")
        a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
        print(json.dumps(paired_f1_test(a["report"]["per_item_f1"], b["report"]["per_item_f1"]), indent=2))
        return
    from patho_r1.data import load_records
    from patho_r1.eval.generation import SamplingConfig, make_generator

    if args.command == "prior":
        records = load_records(args.data, "mcq", check_images=False)
        report = score_detection(prior_items(load_records(args.train, "mcq", check_images=False), records))
        _write_json(args.out, {"prior_from": args.train, "data": args.data, "report": report})
        print(f"prior: F1@0.5 {report['overall']['f1']}, AP50 {report['overall']['AP50']}, "
              f"mean IoU {report['overall']['mean_iou']}")
        return

    records = load_records(args.data, "mcq", limit=args.limit)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    report, responses = evaluate_grounding(make_generator(args.model), records, sampling, blind=args.blind)
    _write_json(args.out, {"model": args.model, "data": args.data, "blind": args.blind, "report": report,
                           "responses": [{"id": r.id, "response": t} for r, t in zip(records, responses, strict=True)]})
    overall = report["overall"]
    print(f"{args.model}{' (blind)' if args.blind else ''}: F1@0.5 {overall['f1']}, AP {overall['AP']}, "
          f"AP50 {overall['AP50']}, mean IoU {overall['mean_iou']}, malformed {report['malformed']}/{report['n']}")


if __name__ == "__main__":
    main()
