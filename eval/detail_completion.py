"""Prompt-guided detail completion at inference: OmniPath's idea done as two generation passes.

OmniPath (Zhang et al., "Efficient and Comprehensive Feature Extraction in Large Vision-Language Model for Pathology
Analysis", arXiv:2412.09521) completes the coarse view of a slide with fine-grained features of the region the
prompt is about ("prompt-guided detail feature completion").  It does so inside the model, with an extra pathology
encoder (UNI); we do it with what Qwen2.5-VL already has, its box answers, and no new weights
(docs/detail-completion.md):

1. **Locate.**  The model sees the first image and the question and answers the one region it needs to see closer,
   as `[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]` in pixels of the image as its processor resized it (parsed by
   the grounding reward's `parse_boxes`; several boxes: their union, or the first).
2. **Crop at a higher magnification.**  The box goes back to the image's own pixels (`patho_r1.boxes.to_original`,
   through the processor's `smart_resize`), is padded, grown to a minimum side and kept inside the image, and the
   crop is taken where more pixels exist than the model saw:
   * from the **slide**, when the record is a tile that says where it lies (`slide`, `x`, `y` in level-0 pixels,
     `downsample` = level-0 pixels per tile pixel, as `curate wsi` writes them): the region is read at a level
     finer than the tile's (the finest whose crop fits `max_crop_pixels`), straight from the slide;
   * else from the **original image**, which the processor would otherwise shrink to its pixel budget.  A crop
     that is then upscaled would add no detail, so none is ever upscaled; one over `max_crop_pixels` is shrunk
     (Lanczos), as the processor would shrink it.
3. **Answer.**  The ordinary request of the benchmark, with the crop appended as one more image and the user turn
   wrapped in `answer_prompt`.

A first answer that is not a box (`malformed`), no box (`empty`), or a box with no area inside the image
(`outside`) falls back to the whole image, at full resolution and capped as a crop is, so the second pass always
has the same two-image shape; every fallback is counted by its reason.  Records without an image are answered
once, as usual (`no_image`).  `zoom` per item is the model's pixels per source pixel in the crop over the same in
the first image: above 1 is a closer look.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, field_validator

from patho_r1.boxes import MAX_PIXELS, MIN_PIXELS, resized_size, to_original
from patho_r1.config import StrictModel
from patho_r1.errors import DataError
from patho_r1.eval.generation import ChatRequest, ResponseGenerator, SamplingConfig
from patho_r1.rewards.grounding import parse_boxes

LOCATE_PROMPT = (
    "{question}\n\nBefore you answer: which one region of this image do you need to see at a higher magnification "
    'to answer? Reply only with a JSON list [{{"bbox_2d": [x1, y1, x2, y2], "label": "..."}}] in the pixels of '
    "the image you see."
)
ANSWER_PROMPT = "The second image is the region of the first that matters, at a higher magnification.\n\n{prompt}"
FALLBACK_PROMPT = "The second image is the first at its full resolution.\n\n{prompt}"

Source = Literal["image", "slide", "fallback", "no_image"]


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


class DetailConfig(StrictModel):
    """How the two passes ask and crop (`eval bench --detail-config FILE.yaml` takes these keys)."""

    locate_prompt: str = Field(LOCATE_PROMPT, description="pass 1's user turn; {question} is the record's question")
    locate_system_prompt: str | None = Field(None, description="pass 1's system prompt (None: none)")
    answer_prompt: str = Field(ANSWER_PROMPT, description="pass 2's user turn; {prompt} is the benchmark's own")
    fallback_prompt: str = Field(FALLBACK_PROMPT, description="pass 2's user turn when the whole image is appended")
    locate_max_new_tokens: int = Field(128, gt=0)
    boxes: Literal["union", "first"] = "union"  # several boxes in the first answer: their union, or the first
    padding: float = Field(0.1, ge=0, le=2, description="share of the box's width (height) added on each side")
    min_crop: int = Field(28, ge=1, description="smallest crop side, in pixels of the first image")
    max_crop_pixels: int | None = Field(None, gt=0, description="largest crop area sent (None: the model's "
                                        "max_pixels); a larger one is shrunk")
    min_pixels: int | None = Field(None, gt=0, description="the model's pixel budget (None: its processor's)")
    max_pixels: int | None = Field(None, gt=0)
    slides_dir: str | None = Field(None, description="where a record's `slide` name is found (the folder `curate "
                                   "wsi --slides` read)")

    @field_validator("locate_prompt")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if _fields(v) != {"question"}:
            raise ValueError("locate_prompt must hold {question} and no other field (double other braces: {{ }})")
        return v

    @field_validator("answer_prompt", "fallback_prompt")
    @classmethod
    def _has_prompt(cls, v: str) -> str:
        if _fields(v) != {"prompt"}:
            raise ValueError("must hold {prompt} (the benchmark's user turn) and no other field")
        return v


@dataclass(frozen=True)
class Budget:
    """The processor's pixel budget: the grid the model answers boxes in."""

    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS

    def kwargs(self) -> dict:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


def budget_of(processor) -> Budget | None:
    """A loaded processor's budget (transformers 5.x keeps it in `size`, 4.x in `min_pixels`/`max_pixels`)."""
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    size = getattr(image_processor, "size", None)

    def read(key: str, attr: str):
        try:  # a dict on 4.x, a SizeDict (item and attribute access) on 5.x
            value = size[key] if size is not None else None
        except (KeyError, TypeError):
            value = None
        return value or getattr(image_processor, attr, None)

    lo, hi = read("shortest_edge", "min_pixels"), read("longest_edge", "max_pixels")
    return Budget(int(lo), int(hi)) if lo and hi else None


def resolve_budget(cfg: DetailConfig, generator=None, processor=None) -> Budget:
    """The config's budget, else the generator's (HF) or the given processor's, else Qwen2.5-VL's defaults."""
    found = budget_of(processor) or budget_of(getattr(generator, "processor", None)) or Budget()
    return Budget(cfg.min_pixels or found.min_pixels, cfg.max_pixels or found.max_pixels)


# ----------------------------------------------------------------------------------------------------------------------
# The box of the first answer, and the crop window around it
# ----------------------------------------------------------------------------------------------------------------------

def located_box(response: str, image_size: tuple[int, int], budget: Budget, pick: str = "union"
                ) -> tuple[list[float] | None, str | None]:
    """The first answer's box in the image's own pixels, clipped to the image, or (None, why not): `malformed`
    (not a box answer, or a box with x2 <= x1 or y2 <= y1), `empty` (`[]`), `outside` (no area in the image)."""
    boxes = parse_boxes(response)
    if boxes is None:
        return None, "malformed"
    if not boxes:
        return None, "empty"
    chosen = [boxes[0]] if pick == "first" else boxes
    if any(b.bbox[2] <= b.bbox[0] or b.bbox[3] <= b.bbox[1] for b in chosen):
        return None, "malformed"
    x1, y1 = min(b.bbox[0] for b in chosen), min(b.bbox[1] for b in chosen)
    x2, y2 = max(b.bbox[2] for b in chosen), max(b.bbox[3] for b in chosen)
    x1, y1, x2, y2 = to_original([x1, y1, x2, y2], image_size, **budget.kwargs())
    w, h = image_size
    x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        return None, "outside"
    return [x1, y1, x2, y2], None


def _span(lo: float, hi: float, padding: float, min_side: int, limit: int) -> tuple[int, int]:
    """One axis of the window: padded, grown about its centre to `min_side`, moved inside [0, limit], its edges
    rounded outwards to whole pixels."""
    side = hi - lo
    lo, hi = lo - padding * side, hi + padding * side
    want = min(max(hi - lo, float(min_side)), float(limit))
    centre = (lo + hi) / 2
    lo = min(max(centre - want / 2, 0.0), limit - want)
    return max(math.floor(lo + 1e-9), 0), min(math.ceil(lo + want - 1e-9), limit)


def crop_window(box: Sequence[float], image_size: tuple[int, int], padding: float, min_crop: int
                ) -> tuple[int, int, int, int]:
    """The integer window `[x1, y1, x2, y2]` (pixel edges, inside the image) the crop is taken from."""
    x1, x2 = _span(box[0], box[2], padding, min_crop, image_size[0])
    y1, y2 = _span(box[1], box[3], padding, min_crop, image_size[1])
    return x1, y1, x2, y2


def _fit(image: Image.Image, max_pixels: int) -> Image.Image:
    """Shrunk (Lanczos, the aspect kept) to at most `max_pixels` pixels; never enlarged."""
    w, h = image.size
    if w * h <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (w * h))
    return image.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------------------------------
# Crops: from the slide a tile came from, or from the original image
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TilePlace:
    """Where a tile lies on its slide: level-0 origin and level-0 pixels per tile pixel (`curate wsi`'s row)."""

    slide: Path
    x: float
    y: float
    factor: float


def tile_place(record, slides_dir: str | None, where: str = "record") -> TilePlace | None:
    """A record's slide place, or None when it names no slide; a slide it names that is not there, a relative name
    that leads out of `slides_dir`, or a place that is not numbers, is a DataError.  A relative name is looked up in
    `slides_dir` only (never the working directory)."""
    name = getattr(record, "slide", None)
    if not name:
        return None
    path = Path(name)
    if not path.is_absolute() and slides_dir:
        path = Path(slides_dir) / path
        inside = os.path.abspath(slides_dir)  # lexical (`..`), not realpath: a folder of links to slides is fine
        if not os.path.abspath(path).startswith(inside.rstrip(os.sep) + os.sep):
            raise DataError(where, None, "slide", f"item {record.id}: slide {str(name)!r} leads outside the slides "
                            f"folder {slides_dir}")
    if not path.is_file() or (not path.is_absolute() and not slides_dir):
        raise DataError(where, None, "slide", f"item {record.id}: slide {str(name)!r} not found"
                        f"{'' if slides_dir else ' (give the slides folder: --slides DIR)'}")
    values = {}
    for key in ("x", "y", "downsample"):
        value = getattr(record, key, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(where, None, key, f"item {record.id}: a tile with a slide needs a number here, got "
                            f"{value!r}")
        values[key] = float(value)
    if values["downsample"] <= 0:
        raise DataError(where, None, "downsample", f"item {record.id}: must be > 0")
    return TilePlace(path, values["x"], values["y"], values["downsample"])


def finer_level(downsamples: Sequence[float], factor: float, area0: float, max_pixels: int) -> int | None:
    """The level to read a crop of `area0` level-0 pixels from: of the levels finer than the tile's `factor`, the
    finest whose crop fits in `max_pixels`, else the coarsest of them; None when the slide has none finer."""
    finer = [i for i, d in enumerate(downsamples) if d < factor * (1 - 1e-6)]
    if not finer:
        return None
    fits = [i for i in finer if area0 / downsamples[i] ** 2 <= max_pixels]
    return min(fits, key=lambda i: downsamples[i]) if fits else max(finer, key=lambda i: downsamples[i])


def slide_region(slide, place: TilePlace, window: Sequence[int], max_pixels: int
                 ) -> tuple[np.ndarray, int, tuple[int, int, int, int]] | None:
    """The window (tile pixels) read from the slide at a finer level: (RGB, level, level-pixel box), or None when
    no level is finer than the tile."""
    f = place.factor
    x1, y1 = place.x + window[0] * f, place.y + window[1] * f
    x2, y2 = place.x + window[2] * f, place.y + window[3] * f
    level = finer_level(slide.downsamples, f, (x2 - x1) * (y2 - y1), max_pixels)
    if level is None:
        return None
    ds = slide.downsamples[level]
    lx1, ly1 = math.floor(x1 / ds + 1e-9), math.floor(y1 / ds + 1e-9)
    lx2, ly2 = math.ceil(x2 / ds - 1e-9), math.ceil(y2 / ds - 1e-9)
    pixels = slide.read_region(int(round(lx1 * ds)), int(round(ly1 * ds)), level, lx2 - lx1, ly2 - ly1)
    return pixels, level, (lx1, ly1, lx2, ly2)


class SlideCache:
    """Slides opened once per run, closed at its end."""

    def __init__(self):
        self._open: dict[Path, object] = {}

    def get(self, path: Path):
        if path not in self._open:
            from patho_r1.slides import open_slide

            self._open[path] = open_slide(path)
        return self._open[path]

    def close(self) -> None:
        for slide in self._open.values():
            slide.close()
        self._open.clear()

    def __enter__(self) -> SlideCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class DetailOutcome:
    """What the second pass was given for one item."""

    id: str
    source: Source
    reason: str | None = None  # fallback: malformed / empty / outside; image: why not the slide
    locate_response: str | None = None
    box: list[float] | None = None  # the located box, the first image's pixels
    window: list[int] | None = None  # the crop window, the first image's pixels
    level: int | None = None  # slide: the level read
    level_box: list[int] | None = None  # slide: the window in that level's pixels
    crop_size: list[int] | None = None  # the crop as sent (width, height)
    zoom: float | None = None  # the model's pixels per source pixel, crop over first image

    @property
    def cropped(self) -> bool:
        return self.source in ("image", "slide")


def _zoom(first_size: tuple[int, int], first_factor: float, crop_size: tuple[int, int], crop_span0: float,
          budget: Budget) -> float:
    """Model pixels per level-0 (or original) pixel across, in the crop over in the first image."""
    seen_first = resized_size(*first_size, **budget.kwargs())[0] / (first_size[0] * first_factor)
    seen_crop = resized_size(*crop_size, **budget.kwargs())[0] / crop_span0
    return round(seen_crop / seen_first, 4)


def detail_view(record, image: Image.Image, response: str, cfg: DetailConfig, budget: Budget,
                slides: SlideCache | None = None, where: str = "record") -> tuple[Image.Image, DetailOutcome]:
    """The second image for one item, from the first answer, and what was done to get it."""
    limit = cfg.max_crop_pixels or budget.max_pixels
    size = image.size
    out = DetailOutcome(id=str(record.id), source="fallback", locate_response=response)
    box, why = located_box(response, size, budget, cfg.boxes)
    if box is None:
        out.reason = why
        crop = _fit(image, limit)
        out.crop_size, out.zoom = list(crop.size), _zoom(size, 1.0, crop.size, size[0], budget)
        return crop, out
    window = crop_window(box, size, cfg.padding, cfg.min_crop)
    out.box, out.window = [round(v, 3) for v in box], list(window)
    place = tile_place(record, cfg.slides_dir, where)
    if place is not None and slides is None:  # called alone: the slide is opened for this item and closed after
        with SlideCache() as own:
            return detail_view(record, image, response, cfg, budget, own, where)
    if place is not None:
        read = slide_region(slides.get(place.slide), place, window, limit)
        if read is not None:
            pixels, level, level_box = read
            crop = _fit(Image.fromarray(pixels), limit)
            span0 = (window[2] - window[0]) * place.factor
            out.source, out.level, out.level_box = "slide", level, list(level_box)
            out.crop_size, out.zoom = list(crop.size), _zoom(size, place.factor, crop.size, span0, budget)
            return crop, out
        out.reason = "no level finer than the tile"
    crop = _fit(image.crop(window), limit)
    out.source = "image"
    out.crop_size, out.zoom = list(crop.size), _zoom(size, 1.0, crop.size, window[2] - window[0], budget)
    return crop, out


# ----------------------------------------------------------------------------------------------------------------------
# The two passes
# ----------------------------------------------------------------------------------------------------------------------

def locate_request(record, image: Image.Image, cfg: DetailConfig) -> ChatRequest:
    """Pass 1: the first image and the question, asking for a box."""
    content = [{"type": "image"}, {"type": "text", "text": cfg.locate_prompt.format(question=record.question)}]
    system = [{"role": "system", "content": cfg.locate_system_prompt}] if cfg.locate_system_prompt else []
    return ChatRequest(messages=[*system, {"role": "user", "content": content}], images=[image])


def with_detail(request: ChatRequest, crop: Image.Image, template: str) -> ChatRequest:
    """Pass 2: the ordinary request with the crop appended after its images and its user text wrapped."""
    messages = copy.deepcopy(request.messages)
    user = next(m for m in reversed(messages) if m["role"] == "user")
    parts = user["content"]
    last_image = max(i for i, p in enumerate(parts) if p.get("type") == "image")
    parts.insert(last_image + 1, {"type": "image"})
    text = next(p for p in reversed(parts) if p.get("type") == "text")
    text["text"] = template.format(prompt=text["text"])
    return ChatRequest(messages=messages, images=[*request.images, crop])


@dataclass
class TwoPassResult:
    responses: list[str]
    outcomes: list[DetailOutcome]
    counts: dict = field(default_factory=dict)


def summarise_outcomes(outcomes: Sequence[DetailOutcome]) -> dict:
    """How many items used a crop (from the slide, from the image) and how many fell back, by reason."""
    by_source = Counter(o.source for o in outcomes)
    reasons = Counter(o.reason for o in outcomes if o.source == "fallback")
    zooms = [o.zoom for o in outcomes if o.cropped and o.zoom is not None]
    n = len(outcomes)
    return {"n": n, "cropped": by_source["image"] + by_source["slide"], "from_slide": by_source["slide"],
            "from_image": by_source["image"], "fell_back": by_source["fallback"], "no_image": by_source["no_image"],
            "fallback_reasons": dict(sorted(reasons.items())),
            "fallback_rate": round(by_source["fallback"] / n, 4) if n else None,
            "mean_zoom": round(float(np.mean(zooms)), 4) if zooms else None}


def two_pass(records: Sequence, base_request: Callable[[object], ChatRequest], generator: ResponseGenerator,
             sampling: SamplingConfig, cfg: DetailConfig, budget: Budget, *, where: str = "record",
             progress=None) -> TwoPassResult:
    """Both passes for every record, a chunk at a time (a few batches: crops never pile up in memory).
    `base_request(record)` is the ordinary one-pass request; its first image is the one a box is asked on."""
    locate_sampling = dataclasses.replace(sampling, max_new_tokens=cfg.locate_max_new_tokens)
    chunk = max(sampling.batch_size * 4, 1)
    responses: list[str] = []
    outcomes: list[DetailOutcome] = []
    with SlideCache() as slides:
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            base = [base_request(r) for r in part]
            seeing = [i for i, req in enumerate(base) if req.images]
            located = generator.generate([locate_request(part[i], base[i].images[0], cfg) for i in seeing],
                                         locate_sampling) if seeing else []
            second, part_outcomes = list(base), [DetailOutcome(id=str(r.id), source="no_image") for r in part]
            for i, response in zip(seeing, located, strict=True):
                crop, part_outcomes[i] = detail_view(part[i], base[i].images[0], response, cfg, budget, slides,
                                                     where)
                template = cfg.fallback_prompt if part_outcomes[i].source == "fallback" else cfg.answer_prompt
                second[i] = with_detail(base[i], crop, template)
            responses += generator.generate(second, sampling)
            outcomes += part_outcomes
            if progress is not None:
                progress.advance(len(part))
    return TwoPassResult(responses, outcomes, summarise_outcomes(outcomes))


# ----------------------------------------------------------------------------------------------------------------------
# A benchmark with and without it, paired
# ----------------------------------------------------------------------------------------------------------------------

def paired_accuracy(rows_without: Sequence, rows_with: Sequence) -> dict:
    """Both accuracies on the items both runs decided (the same items, in the same order), and McNemar's exact test
    on them."""
    from patho_r1.eval.stats import mcnemar, wilson_interval

    pairs = [(a.correct, b.correct) for a, b in zip(rows_without, rows_with, strict=True)
             if a.correct is not None and b.correct is not None]
    if [a.id for a in rows_without] != [b.id for b in rows_with]:
        raise ValueError("paired accuracy needs the same items in the same order on both sides")
    n = len(pairs)

    def part(hits: list[bool]) -> dict:
        lo, hi = wilson_interval(sum(hits), n)
        return {"accuracy": round(sum(hits) / n, 4) if n else None, "ci95": [round(lo, 4), round(hi, 4)]}

    without, with_ = [bool(a) for a, _ in pairs], [bool(b) for _, b in pairs]
    return {"n": n, "without": part(without), "with": part(with_),
            "mcnemar": mcnemar("without", "with", without, with_) if n else None}


def evaluate_with_details(bench, records: list, generator: ResponseGenerator, sampling: SamplingConfig,
                          cfg: DetailConfig, *, budget: Budget | None = None, prompt: str = "cot",
                          scorer: str = "official", count_tokens=None, llm_judge=None, seed: int = 42,
                          where: str = "benchmark", show_progress: bool = False) -> dict:
    """The benchmark answered once as usual and once with detail completion, both scored by the one scoring path:
    {"without": (report, rows), "with": (report, rows), "responses": {...}, "detail": counts, "outcomes",
    "paired"}."""
    from patho_r1.eval.benchmarks import generate_responses
    from patho_r1.eval.scoring import score_responses
    from patho_r1.progress import RowProgress

    budget = budget or resolve_budget(cfg, generator)
    plain = generate_responses(bench, records, generator, sampling, prompt=prompt, show_progress=show_progress)
    progress = RowProgress(f"{bench.name} detail completion", total=len(records), show=show_progress)
    done = two_pass(records, lambda r: bench.request(r, prompt), generator, sampling, cfg, budget, where=where,
                    progress=progress)
    progress.close()
    scored = {}
    for side, responses in (("without", plain), ("with", done.responses)):
        scored[side] = score_responses(bench, records, responses, scorer=scorer, count_tokens=count_tokens,
                                       llm_judge=llm_judge, seed=seed)
    return {"without": scored["without"], "with": scored["with"], "responses": {"without": plain,
            "with": done.responses}, "detail": {**done.counts, "budget": dataclasses.asdict(budget)},
            "outcomes": done.outcomes, "paired": paired_accuracy(scored["without"][1], scored["with"][1])}


def evaluate_grounding_with_details(generator: ResponseGenerator, records: Sequence, sampling: SamplingConfig,
                                    cfg: DetailConfig, *, budget: Budget | None = None,
                                    system_prompt: str | None = None) -> dict:
    """The grounding eval (`eval/detection.py`: RL-form prompts whose `answer` is the target box JSON) without and
    with detail completion on the same prompts: both score sets (F1@0.5, AP, ...), the paired F1 test, the counts.
    The requests are `evaluate_grounding`'s (Patho-R1's reasoning system prompt unless one is given)."""
    from patho_r1.eval.detection import detection_items, evaluate_grounding, paired_f1_test, score_detection
    from patho_r1.eval.mcq import build_request
    from patho_r1.rewards.parsing import REASONING_SYSTEM_PROMPT

    system = REASONING_SYSTEM_PROMPT if system_prompt is None else system_prompt
    budget = budget or resolve_budget(cfg, generator)
    without, plain = evaluate_grounding(generator, records, sampling, system_prompt=system)
    done = two_pass(records, lambda r: build_request(r, system), generator, sampling, cfg, budget)
    with_ = score_detection(detection_items(records, done.responses))
    return {"without": without, "with": with_, "paired": paired_f1_test(without["per_item_f1"], with_["per_item_f1"]),
            "detail": {**done.counts, "budget": dataclasses.asdict(budget)}, "outcomes": done.outcomes,
            "responses": {"without": plain, "with": done.responses}}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


DETAIL_DIR = "detail-completion"


def write_detail_results(out_dir: str | Path, result: dict, title: str, *, skipped: Sequence[dict] = (),
                         context: dict | None = None, config: DetailConfig | None = None) -> dict:
    """The run without detail completion in `out_dir` (the files `eval bench` always writes), the run with it in
    `out_dir/detail-completion/` (the same files, plus `details.jsonl`: each item's box, crop and source), and the
    paired comparison in both reports and in `detail-completion/comparison.json`; returns the comparison."""
    from patho_r1.eval.scoring import write_results

    out = Path(out_dir)
    comparison = {"paired": result["paired"], "detail": result["detail"], **(context or {}),
                  "config": config.model_dump() if config else None}
    for side, folder, name in (("without", out, title), ("with", out / DETAIL_DIR, f"{title} + detail completion")):
        report, rows = result[side]
        report.update(context or {}, skipped=len(skipped), detail_completion=side == "with",
                      detail_comparison={"paired": result["paired"], "detail": result["detail"]})
        write_results(folder, report, rows, name, skipped=list(skipped))
    _write_text(out / DETAIL_DIR / "details.jsonl",
                "".join(json.dumps(dataclasses.asdict(o)) + "\n" for o in result["outcomes"]))
    _write_text(out / DETAIL_DIR / "comparison.json", json.dumps(comparison, indent=2) + "\n")
    return comparison


def run_detail_benchmark(name: str, data: str | Path, model: str, out_dir: str | Path, *, detail: DetailConfig,
                         engine: str = "hf", prompt: str = "cot", split: str | None = None,
                         subsets: list[str] | None = None, question_filter: str | None = None,
                         images: str | None = None, limit: int | None = None, on_error: str = "raise",
                         max_new_tokens: int = 512, batch_size: int = 16, scorer: str = "official",
                         llm_judge=None, seed: int = 42, show_progress: bool = False) -> dict:
    """`eval bench --detail-completion`: one benchmark for one checkpoint, answered without and with detail
    completion on the same items; both written, compared paired."""
    from patho_r1.eval.benchmarks import get_benchmark, load_generator
    from patho_r1.eval.mcq import response_length

    bench = get_benchmark(name)
    loaded = bench.read(data, images=images, split=split, subsets=subsets, question_filter=question_filter,
                        limit=limit, on_error=on_error)
    generator, tokenizer, processor = load_generator(model, engine)
    if processor is None:  # vLLM loads the model itself: the processor only for its pixel budget
        from patho_r1.models import load_processor

        processor = load_processor(model)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    result = evaluate_with_details(bench, loaded.records, generator, sampling, detail,
                                   budget=resolve_budget(detail, generator, processor), prompt=prompt, scorer=scorer,
                                   count_tokens=response_length(tokenizer), llm_judge=llm_judge, seed=seed,
                                   where=str(data), show_progress=show_progress)
    label = "/".join(Path(str(model)).parts[-2:])
    context = {"prompt": prompt, "model": str(model), "data": str(data), "split": split, "subsets": subsets,
               "question_filter": question_filter, "filtered": loaded.filtered}
    return write_detail_results(out_dir, result, f"{bench.name}: {label} ({prompt})", skipped=loaded.skipped,
                                context=context, config=detail)


def load_detail_config(path: str | Path | None, **overrides) -> DetailConfig:
    """A DetailConfig from a YAML file (or the defaults), with the given keys (those not None) set over it."""
    from patho_r1.config import read_yaml, validate_config

    data = read_yaml(path) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return validate_config(DetailConfig, data, source=str(path) if path else "--detail-completion")
