"""A deterministic synthetic pathology world: H&E-like tiles whose class is visible, and every dataset kind drawn from it.

Tiles are rendered in optical-density space (Beer-Lambert): a haematoxylin and an eosin concentration map are mixed
through per-tile jittered stain vectors, `rgb = 255 * exp(-(c_h * h + c_e * e))`.  That gives H&E-like colour and a
realistic kind of stain variation for free.  Each tissue class differs in what a pathologist would look at: nuclear
density and size, gland-like rings, necrotic debris, mucin pools, fat vacuoles.

From one world (a seed and a `WorldConfig`) we write the five dataset kinds the trainers consume:
CPT captions, CoT SFT conversations, RL MCQs, embedding pairs and composed queries, and a VLMEvalKit TSV split.
Everything is a pure function of (seed, index), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

LETTERS = "ABCDEF"

# Reference H&E stain vectors in optical density (Macenko et al. / Ruifrok & Johnston), rows: H, E.
_H_REF = np.array([0.65, 0.70, 0.29])
_E_REF = np.array([0.07, 0.99, 0.11])


@dataclass(frozen=True)
class TissueClass:
    key: str
    name: str
    evidence: tuple[str, ...]  # what is visible, phrased the way a report would
    architecture: str
    density: str  # nuclear density, as words
    background: str


TISSUES: tuple[TissueClass, ...] = (
    TissueClass("stroma", "benign fibrous stroma",
                ("abundant pink fibrous stroma", "sparse elongated nuclei"),
                "wavy collagen fibres without glands", "low", "dense pink collagen"),
    TissueClass("adenocarcinoma", "adenocarcinoma",
                ("gland-like rings lined by crowded nuclei", "irregular lumens"),
                "back-to-back gland-like rings", "moderate", "pink stroma between glands"),
    TissueClass("lymphocytes", "lymphocytic infiltrate",
                ("sheets of small dark round nuclei", "scant cytoplasm"),
                "diffuse sheets without architecture", "very high", "little visible stroma"),
    TissueClass("necrosis", "coagulative necrosis",
                ("pale eosinophilic background", "scattered nuclear debris"),
                "loss of tissue architecture", "very low", "pale pink granular material"),
    TissueClass("mucin", "mucinous pools",
                ("pale bluish extracellular pools", "few floating cells"),
                "lakes of extracellular mucin", "low", "pale blue-grey mucin"),
    TissueClass("adipose", "adipose tissue",
                ("large empty vacuoles", "thin pink septa"),
                "honeycomb of fat cells", "very low", "white empty spaces"),
)
TISSUE_BY_KEY = {t.key: t for t in TISSUES}

STAIN_LEVELS = ("light", "dark")  # the attribute composed image+text -> image queries modify

REASONING_SYSTEM_PROMPT = (
    "You are a pathology expert, your task is to answer question step by step. Use the following format:"
    "<think> Your step-by-step reasoning </think><answer> Your final answer </answer>"
)

ASPECTS = {  # image+text -> text queries: the text picks the aspect, the image picks the class
    "architecture": "What is the tissue architecture?",
    "density": "How dense are the nuclei?",
    "background": "What does the background look like?",
}


@dataclass(frozen=True)
class WorldConfig:
    tile_size: int = 56
    n_train_tiles: int = 600
    n_heldout_tiles: int = 120
    n_sft: int = 480
    n_rl: int = 240
    n_rl_heldout: int = 60
    n_embed_pairs: int = 480
    n_composed_per_task: int = 48
    min_options: int = 4
    max_options: int = 6


@dataclass
class Tile:
    index: int
    tissue: TissueClass
    stain: str
    split: str
    path: str  # relative to the world root

    @property
    def ref(self) -> str:
        """The image reference written into dataset files, which all sit one folder below the world root."""
        return f"../{self.path}"

    @property
    def caption(self) -> str:
        return caption_for(self.tissue, variant=self.index)


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------

def _discs(shape, centres, radii, values, aspect=None, angles=None) -> np.ndarray:
    """Sum of soft-edged (elliptical) discs; the workhorse for nuclei, debris, lumens and vacuoles."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros(shape, np.float32)
    for i, ((cy, cx), r, v) in enumerate(zip(centres, radii, values)):
        dy, dx = yy - cy, xx - cx
        if aspect is not None:
            a, t = aspect[i], angles[i]
            u = dx * np.cos(t) + dy * np.sin(t)
            s = -dx * np.sin(t) + dy * np.cos(t)
            d = np.sqrt((u / a) ** 2 + (s * a) ** 2)
        else:
            d = np.sqrt(dy * dy + dx * dx)
        out += v * np.clip(r + 0.5 - d, 0.0, 1.0)
    return out


def _smooth_noise(rng: np.random.Generator, shape, scale: int) -> np.ndarray:
    small = rng.random((max(2, shape[0] // scale), max(2, shape[1] // scale))).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize(shape[::-1], Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def render_tile(tissue: TissueClass, rng: np.random.Generator, size: int = 56, stain: str = "light") -> np.ndarray:
    """Render one RGB uint8 tile of `tissue`; all randomness comes from `rng`."""
    shape = (size, size)
    area = size * size / (56 * 56)
    noise = _smooth_noise(rng, shape, 4)
    fibres = 0.5 + 0.5 * np.sin((np.arange(size)[None, :] * 0.9 + np.arange(size)[:, None] * 0.35)
                                + 3 * _smooth_noise(rng, shape, 8) * np.pi)
    conc_h = np.zeros(shape, np.float32)
    conc_e = np.zeros(shape, np.float32)

    def place(n):
        return rng.uniform(0, size, size=(max(int(round(n * area)), 0), 2))

    key = tissue.key
    if key == "stroma":
        conc_e += 0.55 + 0.25 * fibres + 0.1 * noise
        n = rng.integers(4, 8)
        c = place(n)
        conc_h += _discs(shape, c, rng.uniform(1.5, 2.2, len(c)), rng.uniform(1.0, 1.3, len(c)),
                         aspect=rng.uniform(2.0, 3.0, len(c)), angles=np.full(len(c), 0.35))
    elif key == "adenocarcinoma":
        conc_e += 0.45 + 0.15 * noise
        for _ in range(int(rng.integers(2, 4))):
            cy, cx = rng.uniform(10, size - 10, 2)
            r = rng.uniform(5.0, 8.0) * np.sqrt(area) ** 0.5
            lumen = _discs(shape, [(cy, cx)], [r], [1.0])
            conc_e *= 1.0 - 0.9 * np.clip(lumen, 0, 1)
            k = int(rng.integers(9, 14))
            t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 1)
            ring = np.stack([cy + (r + 2.0) * np.sin(t), cx + (r + 2.0) * np.cos(t)], 1)
            conc_h += _discs(shape, ring, rng.uniform(1.6, 2.3, k), rng.uniform(1.1, 1.4, k))
        c = place(rng.integers(6, 10))
        conc_h += _discs(shape, c, rng.uniform(1.8, 2.4, len(c)), rng.uniform(1.0, 1.3, len(c)))
    elif key == "lymphocytes":
        conc_e += 0.3 + 0.1 * noise
        c = place(rng.integers(70, 95))
        conc_h += _discs(shape, c, rng.uniform(1.2, 1.7, len(c)), rng.uniform(1.3, 1.7, len(c)))
    elif key == "necrosis":
        conc_e += 0.32 + 0.2 * noise
        c = place(rng.integers(35, 55))
        conc_h += _discs(shape, c, rng.uniform(0.3, 0.8, len(c)), rng.uniform(0.7, 1.1, len(c)))
        c = place(rng.integers(0, 3))
        conc_h += _discs(shape, c, rng.uniform(1.5, 2.0, len(c)), rng.uniform(0.8, 1.0, len(c)))
    elif key == "mucin":
        conc_e += 0.08 + 0.06 * noise
        conc_h += 0.22 + 0.08 * _smooth_noise(rng, shape, 6)
        c = place(rng.integers(2, 5))
        conc_h += _discs(shape, c, rng.uniform(1.5, 2.0, len(c)), rng.uniform(0.9, 1.2, len(c)))
    elif key == "adipose":
        conc_e += 0.5
        k = int(rng.integers(5, 9))
        centres = rng.uniform(0, size, (k, 2))
        vac = _discs(shape, centres, rng.uniform(7, 12, k) * np.sqrt(area), np.ones(k))
        conc_e *= 1.0 - np.clip(vac, 0, 1) * 0.97
        conc_e = np.where(np.clip(vac, 0, 1) > 0.999, conc_e, np.maximum(conc_e, 0.15))
        c = place(rng.integers(0, 3))
        conc_h += _discs(shape, c, rng.uniform(1.2, 1.6, len(c)), rng.uniform(0.8, 1.0, len(c)))
    else:  # pragma: no cover - the class list is closed
        raise ValueError(f"unknown tissue {key}")

    # Stain variation: jittered stain vectors and a per-tile concentration scale (light vs dark protocol).
    h_vec = _H_REF + rng.normal(0, 0.04, 3)
    e_vec = _E_REF + rng.normal(0, 0.04, 3)
    h_vec, e_vec = np.abs(h_vec) / np.linalg.norm(h_vec), np.abs(e_vec) / np.linalg.norm(e_vec)
    scale = rng.uniform(0.7, 0.9) if stain == "light" else rng.uniform(1.25, 1.5)
    od = scale * (conc_h[..., None] * h_vec + conc_e[..., None] * e_vec)
    od += rng.normal(0, 0.02, od.shape)  # sensor noise
    rgb = 255.0 * np.exp(-np.clip(od, 0, None))
    return np.clip(rgb, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------------------

_CAPTION_TEMPLATES = (
    "H&E-stained tile showing {e0} and {e1}, consistent with {name}.",
    "This H&E image shows {e0} with {e1}; the findings suggest {name}.",
    "Histology patch with {e0} and {e1}. Diagnosis: {name}.",
    "Microscopy reveals {e0} and {e1}, in keeping with {name}.",
)


def caption_for(tissue: TissueClass, variant: int = 0) -> str:
    tpl = _CAPTION_TEMPLATES[variant % len(_CAPTION_TEMPLATES)]
    return tpl.format(e0=tissue.evidence[0], e1=tissue.evidence[1], name=tissue.name)


def class_description(tissue: TissueClass) -> str:
    """Canonical text of a class: the retrieval target for image -> text."""
    return f"{tissue.name}: {tissue.evidence[0]}, {tissue.evidence[1]}."


def aspect_answer(tissue: TissueClass, aspect: str) -> str:
    if aspect == "architecture":
        return f"{tissue.architecture}."
    if aspect == "density":
        return f"{tissue.density} nuclear density."
    return f"{tissue.background}."


def think_for(tissue: TissueClass, conclusion: str) -> str:
    return (f"The tile shows {tissue.evidence[0]} and {tissue.evidence[1]}. "
            f"Nuclear density is {tissue.density}. These features indicate {tissue.name}. {conclusion}")


def mcq_think(tissue: TissueClass, options: dict[str, str]) -> str:
    """Reasoning for an MCQ: the visible evidence, the diagnosis, and the option that names it."""
    letter = next(k for k, v in options.items() if v == tissue.name)
    return think_for(tissue, f"That is option {letter}.")


def text_corpus() -> list[str]:
    """Every phrase the world can emit, so the tiny tokenizer learns the domain's words."""
    out = [REASONING_SYSTEM_PROMPT, *ASPECTS.values(), "Describe the histological features of this tile.",
           "Which tissue type is shown in this H&E tile?", "Answer with the option letter.", "Yes", "No"]
    for t in TISSUES:
        out += [caption_for(t, v) for v in range(len(_CAPTION_TEMPLATES))]
        out += [class_description(t), think_for(t, "The answer is A."), t.architecture, t.density, t.background]
        out += [mcq_think(t, {k: u.name for k, u in zip(LETTERS, TISSUES)})]
        out += [aspect_answer(t, a) for a in ASPECTS]
    return out


# --------------------------------------------------------------------------------------------------------------------
# The world and its datasets
# --------------------------------------------------------------------------------------------------------------------

def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _stream_id(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


@dataclass
class World:
    root: Path
    seed: int
    config: WorldConfig = field(default_factory=WorldConfig)
    tiles: list[Tile] = field(default_factory=list)

    # -- tiles ---------------------------------------------------------------------------------------------------------
    def render_tiles(self) -> None:
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        n_total = self.config.n_train_tiles + self.config.n_heldout_tiles
        self.tiles = []
        for i in range(n_total):
            rng = _rng(self.seed, _stream_id("tile"), i)
            tissue = TISSUES[i % len(TISSUES)]  # balanced classes
            stain = STAIN_LEVELS[int(rng.integers(0, 2))]
            split = "train" if i < self.config.n_train_tiles else "heldout"
            rel = f"images/tile_{i:06d}.png"
            arr = render_tile(tissue, rng, self.config.tile_size, stain)
            (self.root / rel).write_bytes(png_bytes(arr))
            self.tiles.append(Tile(i, tissue, stain, split, rel))

    def split(self, name: str) -> list[Tile]:
        return [t for t in self.tiles if t.split == name]

    # -- helpers -------------------------------------------------------------------------------------------------------
    def _options(self, rng: np.random.Generator, correct: TissueClass) -> tuple[dict[str, str], str]:
        """4-6 options: the correct class plus random distractors, listed in the world's fixed class order (as many
        exam banks do), so the letter of a class varies with which distractors were drawn."""
        n = int(rng.integers(self.config.min_options, self.config.max_options + 1))
        others = [t for t in TISSUES if t.key != correct.key]
        picked = {correct.key} | {others[j].key for j in rng.permutation(len(others))[: n - 1]}
        names = [t.name for t in TISSUES if t.key in picked]
        options = {LETTERS[k]: names[k] for k in range(n)}
        answer = LETTERS[names.index(correct.name)]
        return options, answer

    @staticmethod
    def _mcq_text(question: str, options: dict[str, str]) -> str:
        lines = [question] + [f"{k}. {v}" for k, v in options.items()] + ["Answer with the option letter."]
        return "\n".join(lines)

    # -- CPT -----------------------------------------------------------------------------------------------------------
    def cpt_records(self) -> Iterator[dict]:
        for t in self.split("train"):
            yield {"id": f"cpt-{t.index}", "images": [t.ref], "caption": t.caption}

    # -- SFT -----------------------------------------------------------------------------------------------------------
    def sft_records(self, split: str = "train", n: int | None = None) -> Iterator[dict]:
        tiles = self.split(split)
        n = self.config.n_sft if n is None else n
        kinds = ("mcq", "mcq", "mcq", "description", "complex", "multi_turn")
        for i in range(n):
            rng = _rng(self.seed, _stream_id(f"sft-{split}"), i)
            t = tiles[int(rng.integers(0, len(tiles)))]
            kind = kinds[i % len(kinds)]
            image_part = {"type": "image"}
            if kind in ("mcq", "multi_turn"):
                options, answer = self._options(rng, t.tissue)
                q = self._mcq_text("Which tissue type is shown in this H&E tile?", options)
                mcq_reply = f"<think>{mcq_think(t.tissue, options)}</think><answer>{answer}</answer>"
            if kind == "mcq":
                messages = [{"role": "user", "content": [image_part, {"type": "text", "text": q}]},
                            {"role": "assistant", "content": mcq_reply}]
            elif kind == "description":
                messages = [
                    {"role": "user", "content": [image_part, {"type": "text",
                                                               "text": "Describe the histological features of this tile."}]},
                    {"role": "assistant", "content": (
                        f"<think>I assess architecture, nuclear density and background. {think_for(t.tissue, '')}"
                        f"</think><answer>{caption_for(t.tissue, i)}</answer>")},
                ]
            elif kind == "complex":
                probe = TISSUES[int(rng.integers(0, len(TISSUES)))] if rng.random() < 0.5 else t.tissue
                yes = probe.key == t.tissue.key
                verdict = "Yes" if yes else "No"
                because = (f"This matches {probe.name}." if yes
                           else f"{probe.name} would show {probe.evidence[0]}, which is absent.")
                messages = [
                    {"role": "user", "content": [image_part, {"type": "text",
                                                               "text": f"Is this tile consistent with {probe.name}? Answer Yes or No."}]},
                    {"role": "assistant", "content": f"<think>{think_for(t.tissue, because)}</think><answer>{verdict}</answer>"},
                ]
            else:  # multi_turn
                messages = [
                    {"role": "user", "content": [image_part, {"type": "text", "text": "What do you see in this tile?"}]},
                    {"role": "assistant", "content": (f"<think>{think_for(t.tissue, '')}</think>"
                                                      f"<answer>{caption_for(t.tissue, i + 1)}</answer>")},
                    {"role": "user", "content": [{"type": "text", "text": q}]},
                    {"role": "assistant", "content": mcq_reply},
                ]
            yield {"id": f"sft-{split}-{i}", "kind": kind, "category": t.tissue.key, "messages": messages,
                   "images": [t.ref]}

    # -- RL ------------------------------------------------------------------------------------------------------------
    def mcq_records(self, split: str, n: int) -> Iterator[dict]:
        tiles = self.split(split)
        questions = ("Which tissue type is shown in this H&E tile?",
                     "What is the most likely diagnosis for this tile?")
        for i in range(n):
            rng = _rng(self.seed, _stream_id(f"mcq-{split}"), i)
            t = tiles[int(rng.integers(0, len(tiles)))]
            options, answer = self._options(rng, t.tissue)
            yield {"id": f"mcq-{split}-{i}", "images": [t.ref], "question": questions[i % len(questions)],
                   "options": options, "answer": answer, "answer_type": "mcq", "category": t.tissue.key}

    # -- Embedding -----------------------------------------------------------------------------------------------------
    def embed_text_pairs(self) -> Iterator[dict]:
        """Stage 1: text-only pairs (QA / NLI style) about the same concepts."""
        for i in range(self.config.n_embed_pairs):
            rng = _rng(self.seed, _stream_id("embed-text"), i)
            t = TISSUES[int(rng.integers(0, len(TISSUES)))]
            aspect = list(ASPECTS)[i % len(ASPECTS)]
            if i % 2 == 0:
                query = f"Which tissue shows {t.evidence[i % 2]} and {t.evidence[1 - i % 2]}?"
                positive = class_description(t)
            else:
                query = f"{t.name}. {ASPECTS[aspect]}"
                positive = aspect_answer(t, aspect)
            yield {"id": f"t2t-{i}", "task": "t2t", "query": {"text": query}, "positive": {"text": positive}}

    def embed_image_text_pairs(self) -> Iterator[dict]:
        """Stage 2: image -> caption pairs (the PathGen/Quilt analogue)."""
        for t in self.split("train"):
            yield {"id": f"i2t-{t.index}", "task": "i2t", "query": {"images": [t.ref]},
                   "positive": {"text": caption_for(t.tissue, t.index)}, "target_id": t.tissue.key}

    def composed_records(self, split: str) -> Iterator[dict]:
        """Composed queries; the target depends on both parts of the query, never on one alone."""
        tiles = self.split(split)
        by_key_stain: dict[tuple[str, str], list[Tile]] = {}
        for t in tiles:
            by_key_stain.setdefault((t.tissue.key, t.stain), []).append(t)
        n = self.config.n_composed_per_task
        for i in range(n):
            rng = _rng(self.seed, _stream_id(f"composed-{split}"), i)
            # multi-image -> text: two tiles, the target names both in order.
            a, b = (tiles[int(j)] for j in rng.integers(0, len(tiles), 2))
            yield {"id": f"mi2t-{split}-{i}", "task": "mi2t", "query": {"images": [a.ref, b.ref],
                                                                           "text": "Name the tissue in each tile."},
                   "positive": {"text": f"First tile: {a.tissue.name}. Second tile: {b.tissue.name}."},
                   "target_id": f"{a.tissue.key}|{b.tissue.key}"}
            # image + text -> image: same tissue, stain intensity given by the text.
            src = tiles[int(rng.integers(0, len(tiles)))]
            want = STAIN_LEVELS[int(rng.integers(0, 2))]
            pool = [t for t in by_key_stain.get((src.tissue.key, want), []) if t.index != src.index]
            if pool:
                tgt = pool[int(rng.integers(0, len(pool)))]
                yield {"id": f"it2i-{split}-{i}", "task": "it2i",
                       "query": {"images": [src.ref], "text": f"The same tissue with {want} staining."},
                       "positive": {"images": [tgt.ref]}, "target_id": f"{src.tissue.key}|{want}"}
            # image + text -> text: the text picks the aspect, the image the class.
            t = tiles[int(rng.integers(0, len(tiles)))]
            aspect = list(ASPECTS)[int(rng.integers(0, len(ASPECTS)))]
            yield {"id": f"it2t-{split}-{i}", "task": "it2t", "query": {"images": [t.ref], "text": ASPECTS[aspect]},
                   "positive": {"text": aspect_answer(t.tissue, aspect)}, "target_id": f"{t.tissue.key}|{aspect}"}
            # video (frames) -> text: three tiles of one class read as consecutive frames.
            key = TISSUES[int(rng.integers(0, len(TISSUES)))].key
            same = [x for x in tiles if x.tissue.key == key]
            frames = [same[int(j)].ref for j in rng.integers(0, len(same), 3)]
            yield {"id": f"v2t-{split}-{i}", "task": "v2t", "query": {"frames": frames},
                   "positive": {"text": class_description(TISSUE_BY_KEY[key])}, "target_id": key}

    # -- VLMEvalKit TSV ------------------------------------------------------------------------------------------------
    def write_vlmeval_tsv(self, path: Path, n: int) -> None:
        import csv

        columns = ["index", "image", "question", *LETTERS, "answer", "category"]
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            for i, rec in enumerate(self.mcq_records("heldout", n)):
                b64 = base64.b64encode((path.parent / rec["images"][0]).read_bytes()).decode()
                opts = [rec["options"].get(k, "") for k in LETTERS]
                writer.writerow([i, b64, rec["question"], *opts, rec["answer"], rec["category"]])


def _write_jsonl(path: Path, rows) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n


def generate_world(root: str | Path, seed: int = 0, config: WorldConfig | None = None) -> dict:
    """Write the whole world under `root`; returns the manifest that is also saved as `root/world.json`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cfg = config or WorldConfig()
    world = World(root=root, seed=seed, config=cfg)
    world.render_tiles()
    counts = {
        "cpt/train.jsonl": _write_jsonl(root / "cpt/train.jsonl", world.cpt_records()),
        "sft/train.jsonl": _write_jsonl(root / "sft/train.jsonl", world.sft_records("train")),
        "sft/heldout.jsonl": _write_jsonl(root / "sft/heldout.jsonl", world.sft_records("heldout", cfg.n_rl_heldout)),
        "rl/train.jsonl": _write_jsonl(root / "rl/train.jsonl", world.mcq_records("train", cfg.n_rl)),
        "rl/heldout.jsonl": _write_jsonl(root / "rl/heldout.jsonl", world.mcq_records("heldout", cfg.n_rl_heldout)),
        "embed/text_pairs.jsonl": _write_jsonl(root / "embed/text_pairs.jsonl", world.embed_text_pairs()),
        "embed/image_text_pairs.jsonl": _write_jsonl(root / "embed/image_text_pairs.jsonl",
                                                     world.embed_image_text_pairs()),
        "embed/composed_train.jsonl": _write_jsonl(root / "embed/composed_train.jsonl",
                                                   world.composed_records("train")),
        "embed/composed_heldout.jsonl": _write_jsonl(root / "embed/composed_heldout.jsonl",
                                                     world.composed_records("heldout")),
    }
    (root / "eval").mkdir(exist_ok=True)
    world.write_vlmeval_tsv(root / "eval/PathoSynth_MCQ.tsv", cfg.n_rl_heldout)
    counts["eval/PathoSynth_MCQ.tsv"] = cfg.n_rl_heldout
    manifest = {
        "seed": seed,
        "config": asdict(cfg),
        "classes": [t.key for t in TISSUES],
        "files": counts,
        "n_tiles": len(world.tiles),
    }
    (root / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def world_digest(root: str | Path) -> str:
    """SHA-256 over every file of a generated world (names and bytes): equal digests mean identical worlds."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


__all__ = [
    "TISSUES", "TISSUE_BY_KEY", "TissueClass", "WorldConfig", "World", "generate_world", "world_digest",
    "render_tile", "caption_for", "class_description", "text_corpus", "REASONING_SYSTEM_PROMPT", "LETTERS",
    "STAIN_LEVELS", "ASPECTS",
]
