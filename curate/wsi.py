"""Stage wsi: whole slides -> tiles at chosen magnifications, multi-scale rows and grounding rows.

    patho-r1 curate wsi --slides slides/ --mpp 0.5 2.0 --tile 224 --out curated/01-wsi

Each slide is opened with OpenSlide (tifffile where OpenSlide cannot read a pyramidal TIFF: `patho_r1.slides`), its
tissue found on the thumbnail, and a grid of whole tiles laid at each scale (microns per pixel where the slide states
them, else `levels`); tiles with enough tissue are read at their level and stored as PNG under their content hash.
The stage folder then holds:

    tile.jsonl        one row a tile: id, images [path], slide, x, y (level-0 pixels), level, mpp, downsample, size,
                      tissue
    multiscale.jsonl  (two scales or more) a context tile of the coarsest scale and up to `details` tiles of the
                      finest inside it: images [context, detail...], detail_boxes (each detail in context pixels)
    grounding.jsonl   (a slide with a GeoJSON of regions) one row per tile and label: id, image, question, boxes
                      [{bbox, label}] in the tile's pixels, image_size
    rejects.jsonl     (on_error skip) each slide refused, with its one-line reason

Resume: each slide's tiles and rows are written to a part folder beside the stage folder
(`.<out>.wsi-parts/<key>/`, key = the slide's digest and the tiling settings), made whole by one rename; a run finds
the finished parts and links them in instead of tiling those slides again, so a killed run, or a folder with slides
added, tiles only what is new.  Slides run in this process, a process pool, or on Ray Data (`engine`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from patho_r1.checkpoint import atomic_directory
from patho_r1.curate.config import WSIStage
from patho_r1.curate.engine import ordered_map
from patho_r1.curate.stages import StageContext
from patho_r1.curate.store import IMAGE_DIR, ImageStore, StageWriter, input_digest
from patho_r1.errors import DataError
from patho_r1.slides import (
    SLIDE_SUFFIXES,
    Scale,
    Slide,
    TileSpot,
    open_slide,
    read_tile,
    scale_for_level,
    scale_for_mpp,
    tile_grid,
    tissue_mask,
)

TILE, MULTISCALE, GROUNDING = "tile", "multiscale", "grounding"
DONE = "part.json"  # written last into a part: its counts
DEFAULT_MPP = 0.5  # about a 20x objective
QUESTION = "Locate every {label} region in this image. Answer with a box for each."


def find_slides(path: Path) -> list[Path]:
    """A slide file, or the slides in a folder (recursively, by suffix), in name order."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)


def count_slides(stage: WSIStage) -> int | None:
    """The rows to expect, for the progress bar and the engine's choice: one per slide."""
    path = Path(stage.slides)
    return len(find_slides(path)) if path.exists() else None


def parts_folder(final: Path) -> Path:
    return final.parent / f".{final.name}.wsi-parts"


@dataclass
class SlideResult:
    """What tiling one slide gave: its part folder, or the reason it was refused (path, row, field, message)."""

    slide: str
    part: str = ""
    reused: bool = False
    error: list = field(default_factory=list)

    def as_row(self) -> dict:  # Ray Data's rows: plain values
        return {"slide": self.slide, "part": self.part, "reused": self.reused, "error": json.dumps(self.error)}


class SlideTiler:
    """Tile one slide into its part folder, or find it there already.  Sent once to each pool worker or Ray task;
    holds only settings."""

    def __init__(self, stage: WSIStage, parts: Path):
        self.stage, self.parts = stage, parts
        self.root = Path(stage.slides) if Path(stage.slides).is_dir() else Path(stage.slides).parent
        self.settings = json.dumps(stage.tiling(), sort_keys=True)

    def annotations_of(self, slide: Path) -> Path | None:
        folder = Path(self.stage.annotations) if self.stage.annotations else slide.parent
        found = [folder / f"{slide.stem}{ext}" for ext in (".geojson", ".json")]
        return next((p for p in found if p.is_file()), None)

    def name_of(self, slide: Path) -> str:
        """The slide's name in rows: its path under the slides folder."""
        return slide.relative_to(self.root).as_posix() if slide.is_relative_to(self.root) else slide.name

    def key(self, slide: Path) -> str:
        """What decides a slide's part: its name in rows, its bytes (`input_digest`), its GeoJSON's, the settings."""
        notes = self.annotations_of(slide)
        text = f"{self.name_of(slide)}|{input_digest(slide)}|{input_digest(notes) if notes else ''}|{self.settings}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def __call__(self, slide: Path) -> SlideResult:
        slide = Path(slide)
        part = self.parts / self.key(slide)
        if (part / DONE).is_file():
            return SlideResult(str(slide), str(part), reused=True)
        try:
            with atomic_directory(part) as tmp:
                _tile_into(SlideJob(self, slide, tmp))
        except DataError as exc:
            return SlideResult(str(slide), error=[exc.path, exc.row, exc.field, exc.message])
        return SlideResult(str(slide), str(part))


@dataclass
class SlideJob:
    """One slide being tiled into `out` (its part's temporary folder)."""

    tiler: SlideTiler
    path: Path
    out: Path
    writer: StageWriter = field(init=False)
    store: ImageStore = field(init=False)
    name: str = field(init=False)
    counts: Counter = field(default_factory=Counter)  # tiles per scale

    def __post_init__(self):
        self.writer, self.store = StageWriter(self.out), ImageStore(self.out / IMAGE_DIR)
        self.name = self.tiler.name_of(self.path)


def _tile_into(job: SlideJob) -> None:
    """Tile `job`'s slide at every scale, then the multi-scale rows; the part's counts are written last."""
    stage = job.tiler.stage
    with open_slide(job.path) as slide:
        scales = _scales(slide, stage)
        mask = tissue_mask(slide.thumbnail(stage.thumbnail))
        if not mask.any():
            raise DataError(job.path, None, "tissue", "no tissue: nothing on the thumbnail stands out from the "
                            "background (Otsu's threshold on saturation); a blank or empty slide")
        regions = _regions(job.tiler.annotations_of(job.path))
        tiles = {scale: _tile_scale(job, slide, scale, tile_grid(slide, scale, mask, stage.min_tissue), regions)
                 for scale in scales}
    if stage.details and len(scales) > 1:
        _multiscale(job, tiles, stage.details)
    job.writer.close()
    rows = {k[len("rows."):]: v for k, v in job.writer.counts.items() if k.startswith("rows.")}
    (job.out / DONE).write_text(json.dumps({"slide": job.name, "rows": rows, "tiles": dict(job.counts)}))


def _png(rgb) -> bytes:
    """Lossless, so a tile is the slide's pixels exactly."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _scales(slide: Slide, stage: WSIStage) -> list[Scale]:
    if stage.levels is not None:
        return [scale_for_level(slide, level, stage.tile) for level in stage.levels]
    return [scale_for_mpp(slide, mpp, stage.tile, stage.mpp_tolerance) for mpp in stage.mpp or [DEFAULT_MPP]]


def _regions(path: Path | None):
    if path is None:
        return None
    from patho_r1.slide_regions import RegionIndex, read_geojson

    regions = read_geojson(path)
    return RegionIndex(regions) if regions else None


@dataclass(frozen=True)
class StoredTile:
    spot: TileSpot
    image: str  # path in the store, relative to the stage folder
    id: str


def _tile_scale(job: SlideJob, slide: Slide, scale: Scale, spots: list[TileSpot], regions) -> list[StoredTile]:
    """Read, store and describe each tile of one scale, with its grounding rows where the slide has regions."""
    stored = []
    for spot in spots:
        image, _ = job.store.put(_png(read_tile(slide, scale, spot)))
        tile_id = f"{job.name}@{scale.name}/{spot.x}_{spot.y}"
        job.writer.row(TILE, {
            "id": tile_id, "images": [image], "slide": job.name, "x": spot.x, "y": spot.y, "level": scale.level,
            "mpp": scale.mpp, "downsample": round(scale.factor, 6), "size": [scale.tile, scale.tile],
            "tissue": round(spot.tissue, 4)})
        if regions is not None:
            _grounding(job, regions, scale, spot, image, tile_id)
        stored.append(StoredTile(spot, image, tile_id))
    job.counts[scale.name] += len(stored)
    return stored


def _grounding(job: SlideJob, regions, scale: Scale, spot: TileSpot, image: str, tile_id: str) -> None:
    """One row per label of the regions the tile shows: its boxes in the tile's pixels."""
    by_label: dict[str, list] = {}
    for found in regions.boxes(spot.x, spot.y, scale.read * scale.downsample, scale.factor, job.tiler.stage.min_box):
        by_label.setdefault(found["label"], []).append(found)
    for label, boxes in by_label.items():
        job.writer.row(GROUNDING, {"id": f"{tile_id}#{label}", "image": image,
                                   "question": QUESTION.format(label=label.lower()), "boxes": boxes,
                                   "image_size": [scale.tile, scale.tile]})


def _multiscale(job: SlideJob, tiles: dict[Scale, list[StoredTile]], details: int) -> None:
    """Each context tile (the coarsest scale) with up to `details` tiles of the finest scale that lie inside it, the
    most tissue first, and each detail's box in context pixels."""
    coarse = max(tiles, key=lambda s: s.factor)
    fine = min(tiles, key=lambda s: s.factor)
    side_c, side_f = coarse.read * coarse.downsample, fine.read * fine.downsample
    for ctx_tile in tiles[coarse]:
        cx, cy = ctx_tile.spot.x, ctx_tile.spot.y
        inside = [t for t in tiles[fine] if cx <= t.spot.x and t.spot.x + side_f <= cx + side_c + 1e-6
                  and cy <= t.spot.y and t.spot.y + side_f <= cy + side_c + 1e-6]
        chosen = sorted(inside, key=lambda t: -t.spot.tissue)[:details]
        if not chosen:
            continue
        boxes = [[round((t.spot.x - cx) / coarse.factor, 2), round((t.spot.y - cy) / coarse.factor, 2),
                  round((t.spot.x + side_f - cx) / coarse.factor, 2), round((t.spot.y + side_f - cy) / coarse.factor,
                                                                            2)] for t in chosen]
        job.writer.row(MULTISCALE, {
            "id": f"{ctx_tile.id}+{len(chosen)}", "images": [ctx_tile.image, *(t.image for t in chosen)],
            "detail_boxes": boxes, "detail_ids": [t.id for t in chosen], "slide": job.name,
            "mpp": [coarse.mpp, fine.mpp], "levels": [coarse.level, fine.level]})


# ---------------------------------------------------------------------------------------------------------------------
# The stage: every slide, on the chosen engine, then each part linked into the stage folder
# ---------------------------------------------------------------------------------------------------------------------

def _tiled(engine: str, tiler: SlideTiler, slides: list[Path]):
    """Each slide's result, in order: here, in a process pool, or on Ray Data."""
    if engine == "processes":
        yield from ordered_map(tiler, slides)
    elif engine == "ray":
        yield from _on_ray(tiler, slides)
    else:
        yield from map(tiler, slides)


def _on_ray(tiler: SlideTiler, slides: list[Path]):
    import ray.data

    from patho_r1.curate.engine import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items([{"slide": str(p)} for p in slides]).map(lambda row: tiler(Path(row["slide"])).as_row())
    for row in ds.iter_rows():
        yield SlideResult(row["slide"], row["part"], bool(row["reused"]), json.loads(row["error"]))


def _adopt(part: Path, ctx: StageContext) -> dict:
    """A finished part into the stage folder: its images linked into the store (copied across filesystems), its
    rows appended; returns its counts."""
    for image in (part / IMAGE_DIR).rglob("*"):
        target = ctx.work / image.relative_to(part)
        if image.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(image, target)
            except OSError:
                shutil.copyfile(image, target)
    for kind in (TILE, MULTISCALE, GROUNDING):
        file = part / f"{kind}.jsonl"
        if file.is_file():
            text = file.read_text(encoding="utf-8")
            ctx.writer.lines(kind, text, text.count("\n"))
    return json.loads((part / DONE).read_text())


def run_wsi(stage: WSIStage, ctx: StageContext) -> dict:
    """The wsi stage's runner (`curate/stages.py`)."""
    slides = find_slides(Path(stage.slides))
    if not slides:
        raise DataError(stage.slides, None, "slides", f"no slides here (files ending {', '.join(SLIDE_SUFFIXES)})")
    tiler = SlideTiler(stage, parts_folder(ctx.final))
    tiler.parts.mkdir(parents=True, exist_ok=True)
    counts, kinds, tiles = Counter(), Counter(), Counter()
    for result in _tiled(ctx.engine, tiler, slides):
        ctx.progress.advance(1)
        if result.error:
            if stage.on_error == "raise":
                raise DataError(*result.error)
            ctx.writer.reject(*result.error, source="wsi")
            counts["skipped"] += 1
            continue
        done = _adopt(Path(result.part), ctx)
        kinds.update(done["rows"])
        tiles.update(done["tiles"])
        counts["reused" if result.reused else "tiled"] += 1
    return {"slides": len(slides), **{k: counts[k] for k in ("tiled", "reused", "skipped")},
            "tiles": dict(tiles), "kinds": dict(kinds)}
