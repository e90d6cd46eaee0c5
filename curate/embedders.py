"""Joint image + text embeddings of stored rows, for subfield tagging and difficulty clustering.

An embedder is a class built once per worker (Ray Data runs it in an actor pool) and called on a batch of JSONL
lines; it returns `{"emb": (n, d) float32}`, each row L2-normalised.  Three kinds:

- `features` (default, no model): colour and texture statistics of a 32x32 thumbnail (channel means, spreads and
  histograms, gradient energy, share of white and of dark pixels) beside hashed caption words (scikit-learn's
  `HashingVectorizer`) and two length features.  Stain and modality are what separate the subfields, so this
  baseline does well on them, and it runs at thousands of rows a second on a CPU;
- `patho`: our embedding head (`embed/`), a Qwen2.5-VL backbone with its LoRA adapter, given the image and the text;
- `hf`: any Hugging Face image encoder with `get_image_features` (CLIP, SigLIP, PathoCLIP exports), image only.

The model embedders load through the callable the top floor hands in (`model_encoder`), so this module imports
nothing above the ground floor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from patho_r1.curate.minhash import n_words
from patho_r1.curate.rows import image_paths, row_text

TEXT_FEATURES = 256
THUMB = 32


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)).astype(np.float32)


def image_statistics(path: Path) -> np.ndarray:
    img = Image.open(path)
    img.draft("RGB", (THUMB * 2, THUMB * 2))
    rgb = np.asarray(img.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    grey = rgb.mean(axis=2)
    gy, gx = np.abs(np.diff(grey, axis=0)).mean(), np.abs(np.diff(grey, axis=1)).mean()
    coarse = grey.reshape(THUMB // 4, 4, THUMB // 4, 4).mean(axis=(1, 3))
    hist = [np.histogram(rgb[..., c], bins=8, range=(0, 1))[0] / grey.size for c in range(3)]
    return np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1)), *hist,
                           [4 * gy, 4 * gx, 4 * np.abs(np.diff(coarse, axis=0)).mean(),
                            (grey > 0.9).mean(), (grey < 0.2).mean(), rgb.max(axis=2).mean() - rgb.min(axis=2).mean()]])


class FeatureEmbedder:
    def __init__(self, kind: str, base: str, **_: Any):
        from sklearn.feature_extraction.text import HashingVectorizer

        self.kind, self.base = kind, Path(base)
        self.vectorizer = HashingVectorizer(n_features=TEXT_FEATURES, alternate_sign=False, norm="l2")

    def __call__(self, lines: list[str]) -> dict[str, np.ndarray]:
        rows = [json.loads(line) for line in lines]
        texts = [row_text(self.kind, r) for r in rows]
        images = []
        for row in rows:
            paths = image_paths(row, self.base)
            images.append(image_statistics(paths[0]) if paths else np.zeros(36))
        words = np.array([[np.log1p(n_words(t)) / 4, term_density(t)] for t in texts], dtype=np.float32)
        text = np.hstack([self.vectorizer.transform(texts).toarray(), words])
        return {"emb": np.hstack([_l2(np.asarray(images)), _l2(text)]) / np.sqrt(2)}


def term_density(text: str, min_chars: int = 8) -> float:
    """Share of a text's words that are domain terms, counted as words of at least `min_chars` letters (medical
    vocabulary is long: adenocarcinoma, eosinophilic, pleomorphism).  The difficulty criterion `term_density`."""
    import re

    words = re.findall(r"[a-z]+", text.lower())
    return sum(len(w) >= min_chars for w in words) / len(words) if words else 0.0


class ModelEmbedder:
    """A model encoder (`encode(items) -> (n, d)` for dicts with `images` and `text`), loaded once per worker by
    the factory the top floor passes in."""

    def __init__(self, kind: str, base: str, factory: Callable[[], Callable[[list[dict]], np.ndarray]],
                 image_only: bool = False, **_: Any):
        self.kind, self.base, self.image_only = kind, Path(base), image_only
        self.encode = factory()

    def __call__(self, lines: list[str]) -> dict[str, np.ndarray]:
        rows = [json.loads(line) for line in lines]
        items = []
        for row in rows:
            item = {"images": [str(p) for p in image_paths(row, self.base)[:1]]}
            if not self.image_only:
                item["text"] = row_text(self.kind, row)[:2000]
            items.append(item)
        return {"emb": _l2(np.asarray(self.encode(items), dtype=np.float32))}


def embedder_class(spec, model_encoder: Callable | None) -> tuple[type, dict]:
    """The embedder class for a spec and its constructor arguments (besides kind and base)."""
    if spec.kind == "features":
        return FeatureEmbedder, {}
    if model_encoder is None:
        raise ValueError(f"embedder {spec.kind!r} needs a model encoder; run it through `patho-r1 curate` or a "
                         "recipe, which provide one")
    return ModelEmbedder, {"factory": model_encoder(spec), "image_only": spec.kind == "hf"}


EMBEDDINGS = "embeddings.npy"


def embed_rows(files: dict[str, Path], base: Path, spec, n_rows: int, out_path: Path, *, engine: str,
               progress, model_encoder: Callable | None = None, reuse: Path | None = None) -> np.ndarray:
    """Embed every row of `files` (in kind order) into a memory-mapped `out_path`; `reuse` is an embeddings file
    from the parent stage made by the same embedder over the same rows, linked instead of recomputed."""
    import os
    import shutil

    from patho_r1.curate.engine import map_batches

    if reuse is not None and reuse.is_file():
        emb = np.load(reuse, mmap_mode="r")
        if emb.shape[0] == n_rows:
            try:  # a hard link: no second copy of a large file
                os.link(reuse, out_path)
            except OSError:
                shutil.copyfile(reuse, out_path)
            progress.advance(n_rows)
            return np.load(out_path, mmap_mode="r")
    cls, kwargs = embedder_class(spec, model_encoder)
    emb = None
    at = 0
    for kind, file in files.items():
        for batch in map_batches([file], cls, engine=engine, batch_size=spec.batch_size,
                                 constructor_kwargs={"kind": kind, "base": str(base), **kwargs},
                                 concurrency=spec.actors, num_gpus=spec.gpus_per_actor):
            vectors = batch["emb"]
            if emb is None:
                emb = np.lib.format.open_memmap(out_path, "w+", np.float32, (max(n_rows, 1), vectors.shape[1]))
            emb[at:at + len(vectors)] = vectors
            at += len(vectors)
            progress.advance(len(vectors))
    if emb is None:
        emb = np.lib.format.open_memmap(out_path, "w+", np.float32, (1, 1))
    emb.flush()
    if at != n_rows:
        raise RuntimeError(f"embedded {at} rows but the parent manifest counts {n_rows}")
    return np.load(out_path, mmap_mode="r")
