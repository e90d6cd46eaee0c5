"""The grounding reward: boxes in the answer against the target boxes.

    score = w_f1 * F1@IoU>=iou_threshold + w_iou * mean matched IoU

* **Parsing.** The answer is the `<answer>...</answer>` content when there is one, else the whole completion, in
  Qwen2.5-VL's grounding form `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]` (one object alone, or a ```json
  fence around it, is taken too).  Anything else (JSON that does not parse, an item without four finite numbers in
  `bbox_2d`, more than `max_boxes` boxes) is malformed and scores 0.0; nothing here raises on model output.
* **Matching.** Predictions and targets are paired one-to-one to maximise the summed IoU (Hungarian:
  `scipy.optimize.linear_sum_assignment`); IoU is `pycocotools.mask.iou` on `[x, y, w, h]` boxes (pixel edges, no
  `+ 1`: cocodataset/cocoapi@8c9bcc3cf640524c4c20a9c40e89cb6a2f2fa0e9, common/maskApi.c `bbIou`, the IoU COCO's
  evaluation uses).  With `match_labels`, pairs whose labels differ (case and spaces
  aside) have IoU 0.
* **F1.** A pair with IoU >= `iou_threshold` (0.5) is a true positive; `F1 = 2 TP / (n_pred + n_target)`.  A
  duplicate box is a false positive (only one of two copies can be paired).
* **Mean matched IoU.** The paired IoUs summed over `max(n_pred, n_target)`: a box left unpaired, predicted or
  missed, counts as IoU 0, so extra boxes cannot raise it.  This term grades a near miss (IoU 0.4) above a far one,
  which F1 alone cannot.
* **No boxes.** Target and prediction both empty (`[]`: "there is none") scores 1.0 on both terms; one empty and
  the other not scores 0.0.

The targets come from the `answer` column (the same JSON, as `rl/data.py` carries an MCQ record's gold) or from a
`boxes` column (`[{"bbox": [...], "label": ...}]` or the `bbox_2d` form), in the pixels the completion answers in.
A target that does not parse is a data bug and raises.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as coco_mask
from scipy.optimize import linear_sum_assignment

from patho_r1.rewards.parsing import completion_text, extract_answer

_FENCE = re.compile(r"\A```(?:json)?\s*(.*?)\s*```\Z", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class Box:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    label: str = ""


def _box(item, key: str) -> Box | None:
    if not isinstance(item, dict):
        return None
    coords = item.get(key)
    if not isinstance(coords, (list, tuple)) or len(coords) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in coords):
        return None
    label = item.get("label", "")
    return Box(tuple(float(v) for v in coords), label if isinstance(label, str) else str(label))


def parse_boxes(text: str, key: str = "bbox_2d", max_boxes: int | None = None) -> list[Box] | None:
    """The boxes of an answer, or None when it is not one (see the module docstring)."""
    body = extract_answer(text)
    body = (text if body is None else body).strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list) or (max_boxes is not None and len(items) > max_boxes):
        return None
    boxes = [_box(item, key) for item in items]
    return None if any(b is None for b in boxes) else boxes


def target_boxes(value) -> list[Box]:
    """Targets from a column: the answer JSON (`bbox_2d`) or a list of `{"bbox": ..., "label": ...}` dicts."""
    if isinstance(value, str):
        boxes = parse_boxes(value)
    elif isinstance(value, (list, tuple)):
        key = "bbox" if value and isinstance(value[0], dict) and "bbox" in value[0] else "bbox_2d"
        boxes = parse_boxes(json.dumps(list(value)), key=key)
    else:
        boxes = None
    if boxes is None:
        raise ValueError(f"target boxes are not a list of boxes: {str(value)[:120]!r}")
    return boxes


def iou_matrix(preds: Sequence[Box], targets: Sequence[Box]) -> np.ndarray:
    """IoU of every prediction (rows) with every target (columns), by pycocotools."""
    if not preds or not targets:
        return np.zeros((len(preds), len(targets)))

    def xywh(boxes):
        a = np.array([b.bbox for b in boxes], dtype=np.float64)
        return np.stack([a[:, 0], a[:, 1], np.clip(a[:, 2] - a[:, 0], 0, None), np.clip(a[:, 3] - a[:, 1], 0, None)],
                        axis=1)

    return np.asarray(coco_mask.iou(xywh(preds), xywh(targets), [0] * len(targets)), dtype=np.float64)


def _same_label(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


@dataclass(frozen=True)
class Match:
    n_pred: int
    n_target: int
    ious: tuple[float, ...]  # the IoU of each pair the assignment made
    threshold: float

    @property
    def true_positives(self) -> int:
        return sum(iou >= self.threshold for iou in self.ious)

    @property
    def f1(self) -> float:
        if self.n_pred == self.n_target == 0:
            return 1.0
        return 2 * self.true_positives / (self.n_pred + self.n_target)

    @property
    def mean_iou(self) -> float:
        if self.n_pred == self.n_target == 0:
            return 1.0
        return math.fsum(self.ious) / max(self.n_pred, self.n_target)


def match_boxes(preds: Sequence[Box], targets: Sequence[Box], *, iou_threshold: float = 0.5,
                match_labels: bool = False) -> Match:
    """The one-to-one pairing that maximises the summed IoU."""
    ious = iou_matrix(preds, targets)
    if match_labels and ious.size:
        same = np.array([[_same_label(p.label, t.label) for t in targets] for p in preds])
        ious = np.where(same, ious, 0.0)
    rows, cols = linear_sum_assignment(ious, maximize=True) if ious.size else ((), ())
    return Match(len(preds), len(targets), tuple(float(ious[r, c]) for r, c in zip(rows, cols, strict=True)),
                 iou_threshold)


class GroundingReward:
    """Boxes in the answer against the target boxes: w_f1 * F1@IoU>=0.5 + w_iou * mean matched IoU."""

    __name__ = "grounding"

    def __init__(self, w_f1: float = 0.5, w_iou: float = 0.5, iou_threshold: float = 0.5, match_labels: bool = False,
                 max_boxes: int = 100):
        if w_f1 < 0 or w_iou < 0 or w_f1 + w_iou == 0:
            raise ValueError(f"w_f1 and w_iou must be >= 0 and not both 0, got {w_f1}, {w_iou}")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.w_f1, self.w_iou, self.iou_threshold = w_f1, w_iou, iou_threshold
        self.match_labels, self.max_boxes = match_labels, max_boxes

    def score(self, completion, target) -> float:
        preds = parse_boxes(completion_text(completion), max_boxes=self.max_boxes)
        if preds is None:
            return 0.0
        m = match_boxes(preds, target_boxes(target), iou_threshold=self.iou_threshold,
                        match_labels=self.match_labels)
        return self.w_f1 * m.f1 + self.w_iou * m.mean_iou

    def __call__(self, prompts=None, completions=None, completion_ids=None, answer=None, boxes=None,
                 **columns) -> list[float]:
        targets = boxes if boxes is not None else answer
        if targets is None:
            raise ValueError("grounding needs the target boxes in a `boxes` or `answer` column")
        return [self.score(c, t) for c, t in zip(completions, targets, strict=True)]
