"""Boxes between an image's own pixels and the pixels the model sees.

Qwen2.5-VL reads an image resized by its processor to a grid of 28-pixel cells (`smart_resize`: both sides
multiples of `factor` = patch 14 x merge 2, the area inside `[min_pixels, max_pixels]`, the aspect kept as near as
the grid allows), and it answers boxes in **absolute pixels of that resized image** as
`[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`.  The Qwen cookbooks read an answer back to the original image by
the per-axis ratio, `x * width / input_width` with `input_width = image_grid_thw[2] * 14`
(QwenLM/Qwen2.5-VL@f0af2996e843cf46aa5f778c38d6694500c2ca81, cookbooks/ocr.ipynb `plot_text_bounding_boxes`, and
cookbooks/spatial_understanding.ipynb, which the README's "Precise Object Grounding" row links).

Our records store boxes in the original image's pixels (`GroundingRecord`); this module converts them, with the
processor's own `smart_resize` (imported from transformers, never re-implemented), so that training targets,
rewards and scores all use the grid the model sees.

**Convention.** `[x1, y1, x2, y2]` in pixel-edge coordinates: a structure that covers columns 10..19 has `x1 = 10,
x2 = 20` (COCO's continuous convention: `w = x2 - x1`, no `+ 1`).  Edges scale by the per-axis ratio, so a box
covering the whole image maps to the whole resized image.

**Rounding.** Scaling is done in exact rational arithmetic (`fractions.Fraction`):
* `to_resized` rounds each coordinate to the nearest integer (halves up): the model writes integers.  Back in the
  original, that rounding is at most half a resized pixel, so `to_original(to_resized(b))` is within
  `0.5 * width / resized_width` (x) and `0.5 * height / resized_height` (y) of `b`, and exact whenever `b`'s
  coordinates land on whole resized pixels.
* `to_original` does not round (a float, the nearest to the exact ratio): an integer resized box goes to the
  original and back to exactly itself, `to_resized(to_original(r)) == r`, since the float is within 1e-12 of the
  exact value and the nearest integer to it is `r`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from fractions import Fraction

# `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize` is the same function ("Copied from" it); that
# module needs torchvision on transformers 5.x while the PIL backend's does not, so import the latter first.
try:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
except ImportError:  # transformers 4.x: one image-processing module
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

# The processor's defaults (Qwen2VLImageProcessor `size`: shortest_edge 56*56, longest_edge 28*28*1280) and grid.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
FACTOR = 28

Box = Sequence[float]


def resized_size(width: int, height: int, *, min_pixels: int | None = None, max_pixels: int | None = None,
                 factor: int = FACTOR) -> tuple[int, int]:
    """(width, height) of the image the processor makes of a `width x height` image (note: `smart_resize` itself
    takes and returns height first)."""
    h, w = smart_resize(int(height), int(width), factor=factor, min_pixels=min_pixels or MIN_PIXELS,
                        max_pixels=max_pixels or MAX_PIXELS)
    return int(w), int(h)


def _scaled(box: Box, src: tuple[int, int], dst: tuple[int, int]) -> list[Fraction]:
    if len(box) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {len(box)} numbers")
    sx, sy = Fraction(dst[0], src[0]), Fraction(dst[1], src[1])
    x1, y1, x2, y2 = (Fraction(v) for v in box)  # Fraction(float) is the float's exact value
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def _nearest(value: Fraction) -> int:
    """Round half up (`round` would send 2.5 to 2 and 3.5 to 4: a box's edges would move unevenly)."""
    return math.floor(value + Fraction(1, 2))


def to_resized(box: Box, image_size: tuple[int, int], **budget) -> list[int]:
    """An original-pixel box as the model should answer it: integer pixels of the resized image."""
    resized = resized_size(*image_size, **budget)
    return [_nearest(v) for v in _scaled(box, tuple(image_size), resized)]


def to_original(box: Box, image_size: tuple[int, int], **budget) -> list[float]:
    """A box the model answered (resized pixels) in the original image's pixels, unrounded."""
    resized = resized_size(*image_size, **budget)
    return [float(v) for v in _scaled(box, resized, tuple(image_size))]


def round_trip_bound(image_size: tuple[int, int], **budget) -> tuple[float, float]:
    """The most (x, y) an original box moves through `to_resized` then `to_original`: half a resized pixel."""
    w, h = resized_size(*image_size, **budget)
    return image_size[0] / (2 * w), image_size[1] / (2 * h)


def answer_json(boxes: Iterable[dict], image_size: tuple[int, int], **budget) -> str:
    """Qwen2.5-VL's answer for `boxes` (`{"bbox": [...], "label": ...}` in original pixels):
    `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]` in resized pixels, as the model writes it."""
    items = [{"bbox_2d": to_resized(b["bbox"], image_size, **budget), "label": b["label"]} for b in boxes]
    return json.dumps(items, ensure_ascii=False)
