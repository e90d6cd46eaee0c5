"""An embedding suite in one command: `patho-r1 embed bench --suite pmeb --data ROOT --model M`.

A suite is data (`embed/suites/<name>.yaml`, or any YAML path): tasks, each a meta-task (retrieval, composed
retrieval, zero-shot classification), a format of the format table (`patho_r1.formats`), a path under the data root,
and for classification the names of its classes.  The run, per task:

1. **Read** the task's rows through its format.  A row the format rejects (ARCH's captions whose image is missing,
   an image that resolves outside the dataset folder unless `--allow-outside-images`) is dropped, counted and listed
   in the results (`--strict`: the first one stops the run); a missing task folder is skipped with a one-line note
   (`--strict`: an error).
2. **Select** at most `max_samples` items (1,000 in PMEB), stratified by class for classification: items are sorted
   by id before the seeded draw (scikit-learn's `train_test_split`), so the same seed picks the same ids whatever the
   order of the files on disk, and the ids are written to `selection.json` so two models are scored on the same items.
3. **Check** every selected image once: its bytes are hashed (the cache key) and decoded; an image that does not
   decode is a `DataError` naming its file, before any model runs.
4. **Encode** with every model through one `encode(items)` interface (`EMBEDDERS`); each distinct image, text or
   image+text is encoded once per model per run (keyed by content hash), in batches, across all tasks.
5. **Score**: Recall@1/5/10 per direction (image->text, text->image; image+question->answer), accuracy, balanced
   accuracy and weighted F1, each with its chance level and a 95% bootstrap interval (`embed.bench_metrics`).  A
   gallery larger than `faiss_above` is searched through a faiss index (`embed.index`); smaller ones with torch.
   Composed tasks also score each model's "simple add" (image and question embedded apart, added) and
   "question only" queries: what fusion adds over its parts.

Outputs (one folder, written atomically with a manifest): `results.json`, `results.md`, `results.png` (one bar group
per task and direction, chance marked), `selection.json` (the sample ids per task).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from patho_r1 import pmeb_formats as _pmeb_formats  # noqa: F401  (registers the PMEB classification formats)
from patho_r1.config import StrictModel, read_yaml, validate_config
from patho_r1.embed.bench_metrics import classification_metrics, recall_metrics
from patho_r1.errors import ConfigError, DataError

Meta = Literal["retrieval", "composed", "classification"]
SUITES = resources.files("patho_r1.embed") / "suites"


# ----------------------------------------------------------------------------------------------------------------------
# The suite, as data
# ----------------------------------------------------------------------------------------------------------------------

class BenchTask(StrictModel):
    name: str
    meta: Meta
    format: str = Field(description="a format of patho_r1.formats")
    path: str = Field(description="relative to the data root")
    source: str = ""
    classes: dict[str, list[str]] = Field(default_factory=dict, description="label -> names shown to the model")
    templates: list[str] | None = None  # classification prompts; the suite's when None
    split: str | None = None  # keep only rows whose `split` is this (case-insensitive)
    open_only: bool = True  # composed: open-ended questions only (yes/no answers are not retrieval targets)
    max_samples: int | None | Literal["suite"] = "suite"  # None: every item

    @field_validator("format")
    @classmethod
    def _known(cls, v: str) -> str:
        from patho_r1.formats import all_formats

        if v not in all_formats():
            raise ValueError(f"unknown format {v!r}; known: {', '.join(all_formats())}")
        return v


class Suite(StrictModel):
    name: str
    seed: int = 0
    max_samples: int | None = 1000
    templates: list[str] = ["An H&E image of {}."]
    query_template: str = "{question}"  # composed queries' text part
    tasks: list[BenchTask]

    def task_limit(self, task: BenchTask) -> int | None:
        return self.max_samples if task.max_samples == "suite" else task.max_samples


def load_suite(name_or_path: str | Path) -> Suite:
    """A suite shipped with the package (`pmeb`) or a YAML file of the same shape."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = SUITES / f"{name_or_path}.yaml"
        if not shipped.is_file():
            known = sorted(p.name.removesuffix(".yaml") for p in SUITES.iterdir() if p.name.endswith(".yaml"))
            raise ConfigError(f"--suite: {name_or_path} is neither a YAML file nor a shipped suite "
                              f"({', '.join(known)})")
        path = Path(str(shipped))
    # the project's YAML reader and validator: a bad file is one line naming it, its line and its field
    return validate_config(Suite, read_yaml(path), source=str(path))


# ----------------------------------------------------------------------------------------------------------------------
# Reading and selecting items
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class Item:
    id: str
    image: Any  # a file path (str) or encoded bytes
    where: tuple[str, int]  # the row it came from, for errors
    target: str  # caption, answer or label
    text: str | None = None  # composed: the question
    image_key: str = ""  # sha256 of the image's bytes, set when checked


@dataclass
class TaskItems:
    task: BenchTask
    items: list[Item]
    n_read: int = 0
    dropped: list[str] = field(default_factory=list)


def _item(task: BenchTask, conv, where: tuple[str, int]) -> Item | None:
    """The task's item from a converted row, or None where the task leaves the row out by definition."""
    rec = conv.record
    if task.split and str(rec.get("split") or "").lower() != task.split.lower():
        return None
    if task.meta == "retrieval":
        return Item(rec["id"], conv.images[0], where, rec["caption"])
    if task.meta == "composed":
        declared = rec.get("source_answer_type")
        is_open = declared == "OPEN" if declared else rec.get("answer_type") == "open"
        if task.open_only and not is_open:
            return None
        return Item(rec["id"], conv.images[0], where, rec["answer"], text=rec["question"])
    return Item(rec["id"], conv.images[0], where, rec["category"])


def read_task(task: BenchTask, root: Path, strict: bool, allow_outside: bool = False) -> TaskItems:
    """The task's items; a row naming an image outside its dataset folder is refused like a missing one (the
    importer's guard, `check_inside_root`) unless `allow_outside`."""
    from patho_r1.formats import ImageFile, ImportOptions, check_inside_root, get_format

    fmt, opts = get_format(task.format), ImportOptions(allow_outside_images=allow_outside)
    out = TaskItems(task, [])
    for where_file, row, raw in fmt.rows(root / task.path, opts):
        where = (where_file, row)
        out.n_read += 1
        try:
            conv = fmt.convert(raw, where, opts)
            conv.check_files(where)
            for image in conv.images if not allow_outside else ():
                if isinstance(image, ImageFile):
                    check_inside_root(image, where)
        except DataError as exc:
            if strict:
                raise
            out.dropped.append(str(exc))
            continue
        item = _item(task, conv, where)
        if item is not None:
            out.items.append(item)
    return out


def select(items: Sequence[Item], limit: int | None, seed: int, stratify: bool) -> list[Item]:
    """At most `limit` items, the same ones for the same seed whatever the input order: sorted by id, then a seeded
    draw that keeps the class shares (`stratify`).  A class too small to stratify falls back to a plain draw."""
    from sklearn.model_selection import train_test_split

    ordered = sorted(items, key=lambda it: it.id)
    ids = [it.id for it in ordered]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(ordered[ids.index(dup)].where[0], None, "id", f"two items share the id {dup!r}")
    if limit is None or len(ordered) <= limit:
        return ordered
    labels = [it.target for it in ordered] if stratify else None
    try:
        kept, _ = train_test_split(ordered, train_size=limit, stratify=labels, random_state=seed)
    except ValueError:  # a class with one item, or fewer items kept than classes
        kept, _ = train_test_split(ordered, train_size=limit, random_state=seed)
    return sorted(kept, key=lambda it: it.id)


def check_images(items: Sequence[Item], seen: dict[str, str]) -> None:
    """Hash and decode every item's image (once per file per run: `seen` maps a path to its hash); a file that does
    not decode is a DataError naming it and the row that named it."""
    from PIL import Image

    for it in items:
        if isinstance(it.image, str) and it.image in seen:
            it.image_key = seen[it.image]
            continue
        data = it.image if isinstance(it.image, bytes) else Path(it.image).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            name = it.image if isinstance(it.image, str) else f"{it.where[0]}:{it.where[1]} (embedded image)"
            raise DataError(name, None, None, f"not a readable image ({exc.__class__.__name__}: {exc}); named by "
                            f"{it.where[0]}:{it.where[1]}") from None
        it.image_key = hashlib.sha256(data).hexdigest()
        if isinstance(it.image, str):
            seen[it.image] = it.image_key


# ----------------------------------------------------------------------------------------------------------------------
# Embedders: one table, one interface
# ----------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EmbedderKind:
    name: str
    load: Callable[[str], Any]  # path -> an object with `encode(items, batch_size=...) -> np.ndarray`
    fuses: bool  # embeds an image and a text as one input (else: its own image+text input is "simple add")
    summary: str


def _load_homie(path: str):
    """A HOMIE adapter folder (its manifest names the base model), or a base checkpoint used as is."""
    from patho_r1.checkpoint import read_manifest
    from patho_r1.embed.model import Embedder

    manifest = read_manifest(path) if Path(path).is_dir() else None
    base = (manifest.extra or {}).get("base_model") if manifest else None
    return Embedder.from_pretrained(base, adapter=path) if base else Embedder.from_pretrained(path)


def _load_clip(path: str):
    from patho_r1.embed.clip import ClipEmbedder

    return ClipEmbedder.from_pretrained(path)


EMBEDDERS: dict[str, EmbedderKind] = {
    "homie": EmbedderKind("homie", _load_homie, True, "HOMIE head: prompted Qwen2.5-VL, last token (adapter folder "
                          "or base checkpoint)"),
    "clip": EmbedderKind("clip", _load_clip, False, "any transformers CLIP directory: PathoCLIP, PLIP, a CLIP "
                         "checkpoint (open_clip-only checkpoints must be converted)"),
}


@dataclass(frozen=True)
class ModelSpec:
    label: str
    kind: str
    path: str


def parse_model(spec: str) -> ModelSpec:
    """`[LABEL=][KIND:]PATH`; without KIND a directory whose config says `model_type: clip` is a CLIP, anything
    else the HOMIE head."""
    label, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
    kind, sep, path = rest.partition(":")
    if not sep or kind not in EMBEDDERS:
        kind, path = _detect_kind(rest), rest
    could_be_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))  # owner/name
    if not Path(path).exists() and not could_be_hub_id:
        raise ConfigError(f"--model: {path} not found")
    return ModelSpec(label or _label_of(path), kind, path)


def _detect_kind(path: str) -> str:
    config = Path(path) / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except json.JSONDecodeError:
        model_type = None
    return "clip" if model_type == "clip" else "homie"


def _label_of(path: str) -> str:
    p = Path(path)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class CachedEncoder:
    """One model's embeddings, each distinct input encoded once per run: images keyed by the sha256 of their
    bytes, texts by their string, image+text by both.  Misses are encoded in batches of `batch_size`."""

    def __init__(self, model, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size
        self.cache: dict[tuple, np.ndarray] = {}
        self.encoded = 0  # inputs actually sent to the model

    def _get(self, keys: list[tuple], inputs: list[dict]) -> np.ndarray:
        todo: dict[tuple, dict] = {}
        for key, item in zip(keys, inputs, strict=True):
            if key not in self.cache and key not in todo:
                todo[key] = item
        if todo:
            vectors = self.model.encode(list(todo.values()), batch_size=self.batch_size)
            self.encoded += len(todo)
            self.cache.update(zip(todo, np.asarray(vectors, np.float32), strict=True))
        return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, 1), np.float32)

    def images(self, items: Sequence[Item]) -> np.ndarray:
        return self._get([("image", it.image_key) for it in items], [{"images": [it.image]} for it in items])

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._get([("text", t) for t in texts], [{"text": t} for t in texts])

    def fused(self, items: Sequence[Item], texts: Sequence[str]) -> np.ndarray:
        return self._get([("fused", it.image_key, t) for it, t in zip(items, texts, strict=True)],
                         [{"images": [it.image], "text": t} for it, t in zip(items, texts, strict=True)])


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class BenchOptions:
    tasks: list[str] | None = None  # a subset of the suite's task names
    strict: bool = False
    batch_size: int = 32
    n_boot: int = 1000
    faiss_above: int = 4096  # galleries larger than this are searched with a faiss index
    max_samples: int | None | Literal["suite"] = "suite"  # overrides the suite's limit
    seed: int | None = None  # overrides the suite's seed
    baselines: bool = True  # composed: also score simple add and question only
    allow_outside_images: bool = False  # take image files a dataset's rows name outside its folder
    device: str | None = "auto"  # where each model runs ("auto": the GPU when one is visible; None: where it loaded)
    note: Callable[[str], None] = print  # one-line notes (skipped tasks, dropped rows)


def search(queries: np.ndarray, gallery: np.ndarray, k: int, faiss_above: int) -> np.ndarray:
    """The top-k gallery indices of each query by inner product (exact either way)."""
    from patho_r1.embed.evaluate import exact_search

    k = min(k, len(gallery))
    if len(gallery) > faiss_above:
        from patho_r1.embed.index import VectorIndex

        return VectorIndex.build(gallery, kind="flat").search(queries, k)[1]
    return exact_search(queries, gallery, k)[1]


def score_retrieval(enc: CachedEncoder, items: Sequence[Item], opts: BenchOptions, seed: int) -> dict:
    """Image -> text (the gallery holds each caption text once) and text -> image (every image of that text)."""
    index: dict[str, int] = {}
    text_of = [index.setdefault(it.target, len(index)) for it in items]
    texts = list(index)
    img, txt = enc.images(items), enc.texts(texts)
    images_of: list[set[int]] = [set() for _ in texts]
    for i, t in enumerate(text_of):
        images_of[t].add(i)
    i2t = recall_metrics(search(img, txt, 10, opts.faiss_above), [{t} for t in text_of], len(texts),
                         n_boot=opts.n_boot, seed=seed)
    t2i = recall_metrics(search(txt, img, 10, opts.faiss_above), images_of, len(items), n_boot=opts.n_boot,
                         seed=seed)
    return {"i2t": {**i2t, "n_queries": len(items), "n_gallery": len(texts)},
            "t2i": {**t2i, "n_queries": len(texts), "n_gallery": len(items)}}


def composed_queries(enc: CachedEncoder, items: Sequence[Item], texts: Sequence[str], mode: str) -> np.ndarray:
    if mode == "fused":
        return enc.fused(items, texts)
    if mode == "simple add":
        return _normalise(enc.images(items) + enc.texts(texts))
    return enc.texts(texts)  # question only


def score_composed(enc: CachedEncoder, items: Sequence[Item], suite: Suite, mode: str, opts: BenchOptions,
                   seed: int) -> dict:
    """Image + question -> answer, the gallery holding each distinct answer of the task once."""
    index: dict[str, int] = {}
    answer_of = [index.setdefault(it.target, len(index)) for it in items]
    gallery = enc.texts(list(index))
    queries = composed_queries(enc, items, [suite.query_template.format(question=it.text) for it in items], mode)
    m = recall_metrics(search(queries, gallery, 10, opts.faiss_above), [{a} for a in answer_of], len(index),
                       n_boot=opts.n_boot, seed=seed)
    return {"it2t": {**m, "n_queries": len(items), "n_gallery": len(index)}}


def class_names(task: BenchTask, items: Sequence[Item]) -> dict[str, list[str]]:
    """The task's classes and their names: the suite's, which must cover every label in the data; a task that names
    none (a generic format) shows each label with spaces for underscores."""
    labels = sorted({it.target for it in items})
    if not task.classes:
        return {label: [label.replace("_", " ")] for label in labels}
    unnamed = [label for label in labels if label not in task.classes]
    if unnamed:
        raise ConfigError(f"task {task.name}: labels {unnamed} in the data have no entry under `classes` in the suite")
    return task.classes


def score_classification(enc: CachedEncoder, items: Sequence[Item], task: BenchTask, suite: Suite,
                         opts: BenchOptions, seed: int) -> dict:
    """Each class: the normalised mean of its names in every template; each image: the class of highest cosine."""
    names = class_names(task, items)
    templates = task.templates or suite.templates
    classes = list(names)
    prompts = [[t.format(name) for name in names[c] for t in templates] for c in classes]
    flat = enc.texts([p for group in prompts for p in group])
    bounds = np.cumsum([0, *map(len, prompts)])
    class_emb = _normalise(np.stack([flat[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]))
    pred = [classes[i] for i in (enc.images(items) @ class_emb.T).argmax(1)]
    m = classification_metrics([it.target for it in items], pred, classes, n_boot=opts.n_boot, seed=seed)
    return {"classification": {**m, "n_queries": len(items), "n_classes": len(classes)}}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------

def gather(suite: Suite, root: Path, opts: BenchOptions) -> tuple[list[TaskItems], dict[str, str]]:
    """Every requested task's selected, checked items; and the tasks skipped, with why."""
    wanted = opts.tasks or [t.name for t in suite.tasks]
    unknown = sorted(set(wanted) - {t.name for t in suite.tasks})
    if unknown:
        raise ConfigError(f"--tasks: {unknown} not in suite {suite.name} ({', '.join(t.name for t in suite.tasks)})")
    seed = suite.seed if opts.seed is None else opts.seed
    out, skipped, seen = [], {}, {}
    for task in (t for t in suite.tasks if t.name in wanted):
        if not (root / task.path).exists():
            if opts.strict:
                raise DataError(root / task.path, None, None, f"task {task.name}: not found (--strict)")
            skipped[task.name] = f"{root / task.path} not found"
            opts.note(f"skipped {task.name}: {root / task.path} not found")
            continue
        got = read_task(task, root, opts.strict, opts.allow_outside_images)
        if got.dropped:
            opts.note(f"{task.name}: {len(got.dropped)} of {got.n_read} rows dropped, first: {got.dropped[0]}")
        limit = suite.task_limit(task) if opts.max_samples == "suite" else opts.max_samples
        got.items = select(got.items, limit, seed, stratify=task.meta == "classification")
        if not got.items:
            raise DataError(root / task.path, None, None, f"task {task.name}: no items")
        check_images(got.items, seen)
        out.append(got)
    return out, skipped


def score_model(enc: CachedEncoder, kind: EmbedderKind, data: TaskItems, suite: Suite, opts: BenchOptions,
                seed: int) -> dict[str, dict]:
    """One model on one task: {row label suffix: metrics by direction}; composed tasks add the baselines."""
    task = data.task
    if task.meta == "retrieval":
        return {"": score_retrieval(enc, data.items, opts, seed)}
    if task.meta == "classification":
        return {"": score_classification(enc, data.items, task, suite, opts, seed)}
    modes = {"": "fused"}
    if opts.baselines:
        if kind.fuses:  # a CLIP's own image+text input is the simple add already
            modes[" (simple add)"] = "simple add"
        modes[" (question only)"] = "question only"
    return {suffix: score_composed(enc, data.items, suite, mode, opts, seed) for suffix, mode in modes.items()}


def _place(model, device: str | None) -> None:
    """Move a torch model to `device` ("auto": CUDA when visible); other objects (test stand-ins) stay put."""
    if device is None or not hasattr(model, "to"):
        return
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else None
    if device:
        model.to(device)


def _layout_verified(fmt: str) -> bool | None:
    """Whether a PMEB classification format's release layout was checked against a documented source
    (docs/pmeb.md); None for the other formats (their sections in docs/dataset-formats.md say)."""
    ds = _pmeb_formats.DATASETS.get(fmt)
    return ds.verified if ds else None


def run_bench(suite: Suite, root: str | Path, models: Sequence[ModelSpec], opts: BenchOptions,
              loaded: dict[str, Any] | None = None) -> dict:
    """Score every model on every task found; returns the results (see `write_outputs`).  `loaded`: label ->
    an already-loaded model (tests, the phase), used instead of loading from its path."""
    from rich.progress import Progress

    root = Path(root)
    seed = suite.seed if opts.seed is None else opts.seed
    tasks, skipped = gather(suite, root, opts)
    results: dict = {t.task.name: {} for t in tasks}
    encoded = {}
    with Progress(transient=True) as progress:
        bar = progress.add_task("embedding suite", total=len(models) * len(tasks))
        for spec in models:
            kind = EMBEDDERS[spec.kind]
            model = (loaded or {}).get(spec.label)
            model = kind.load(spec.path) if model is None else model
            _place(model, opts.device)
            enc = CachedEncoder(model, opts.batch_size)
            for data in tasks:
                progress.update(bar, description=f"{spec.label}: {data.task.name}")
                for suffix, metrics in score_model(enc, kind, data, suite, opts, seed).items():
                    results[data.task.name][spec.label + suffix] = metrics
                progress.advance(bar)
            encoded[spec.label] = enc.encoded
    return {"suite": suite.name, "seed": seed, "data": str(root), "created": time.time(),
            "models": {m.label: {"kind": m.kind, "path": m.path, "inputs_encoded": encoded[m.label]} for m in models},
            "skipped": skipped,
            "tasks": {t.task.name: {"meta": t.task.meta, "format": t.task.format, "path": t.task.path,
                                    "source": t.task.source, "layout_verified": _layout_verified(t.task.format),
                                    "n_read": t.n_read, "n_items": len(t.items),
                                    "n_dropped": len(t.dropped), "dropped": t.dropped[:20],
                                    "results": results[t.task.name]} for t in tasks},
            "selection": {t.task.name: [it.id for it in t.items] for t in tasks}}
