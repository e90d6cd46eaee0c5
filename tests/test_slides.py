"""Whole slides (`patho_r1.slides`, `curate wsi`): tiles equal the slide's own pixels at their level, bad slides are
named in one line and skipped or fatal, regions become exact boxes per tile, and a rerun tiles only new slides."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from patho_r1.curate.config import WSIStage
from patho_r1.curate.pipeline import run_stage
from patho_r1.curate.store import iter_jsonl
from patho_r1.curate.wsi import DONE, parts_folder
from patho_r1.data import parse_record
from patho_r1.errors import DataError
from patho_r1.fixtures.slides import CELL, geojson, pyramid, ring, write_pyramid, write_slide_set
from patho_r1.launch.cli import main
from patho_r1.slide_regions import RegionIndex, read_geojson
from patho_r1.slides import open_slide, scale_for_mpp

TILE = 64


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_slide_set(tmp_path_factory.mktemp("slides"))


@pytest.fixture(scope="module")
def tiled(slides, tmp_path_factory):
    """Every slide of the set through the command, bad ones skipped: detail (0.5 um/px) and context (2 um/px)."""
    out = tmp_path_factory.mktemp("wsi") / "out"
    assert main(["curate", "wsi", "--slides", str(slides.root), "--mpp", "0.5", "2.0", "--tile", str(TILE),
                 "--on-error", "skip", "--out", str(out)]) == 0
    return out


def _rows(out: Path, kind: str) -> list[dict]:
    return list(iter_jsonl(out / f"{kind}.jsonl"))


def _pixels(out: Path, image: str) -> np.ndarray:
    return np.asarray(Image.open(out / image).convert("RGB"))


def _level(path: Path, level: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[level].asarray()


def test_the_layout_openslide_reads_and_the_fallback_for_subifds(slides):
    with open_slide(slides.good) as good, open_slide(slides.subifds) as sub:
        assert good.reader == "openslide" and good.levels == [(1024, 768), (512, 384), (256, 192)]
        assert good.downsamples == [1.0, 2.0, 4.0] and good.mpp == pytest.approx((0.5, 0.5))
        assert sub.reader == "tifffile" and sub.levels == good.levels and sub.mpp == pytest.approx((0.5, 0.5))
        for level in range(3):  # both readers give the stored level, pixel for pixel
            expected = _level(slides.good, level)[16:80, 32:96]
            x, y = 32 * 2 ** level, 16 * 2 ** level
            assert np.array_equal(good.read_region(x, y, level, 64, 64), expected)
            assert np.array_equal(sub.read_region(x, y, level, 64, 64), expected)
    with open_slide(slides.no_mpp) as no_mpp:
        assert no_mpp.mpp is None and len(no_mpp.levels) == 3


def test_an_untiled_pyramid_opens_through_tifffile(slides, tmp_path):
    path = write_pyramid(tmp_path / "strips.tif", slides.levels, mpp=0.25, layout="strips")
    with open_slide(path) as strips:  # OpenSlide refuses an untiled TIFF
        assert strips.reader == "tifffile" and strips.mpp == pytest.approx((0.25, 0.25))
        assert np.array_equal(strips.read_region(256, 128, 1, 32, 16), slides.levels[1][64:80, 128:160])


@pytest.mark.parametrize("name", ["good", "subifds"])
def test_every_tile_is_the_region_read_straight_from_its_level(slides, tiled, name):
    rows = [r for r in _rows(tiled, "tile") if r["slide"] == f"{name}/{name}.tif"]
    levels = {lv: _level(getattr(slides, name), lv) for lv in (0, 2)}
    assert {(r["mpp"], r["level"], r["downsample"]) for r in rows} == {(0.5, 0, 1.0), (2.0, 2, 4.0)}
    for row in rows:
        ds = row["downsample"]
        x, y = int(row["x"] / ds), int(row["y"] / ds)
        assert row["x"] == x * ds and x % TILE == 0 and y % TILE == 0  # the grid, from the origin
        expected = levels[row["level"]][y:y + TILE, x:x + TILE]
        assert np.array_equal(_pixels(tiled, row["images"][0]), expected), row["id"]
    # the tissue: 12 x 8 cells of solid tissue at 64 px; at 0.5 um/px every one of them is a tile
    full = {(r["x"], r["y"]) for r in rows if r["mpp"] == 0.5}
    assert {(c * CELL, r * CELL) for c in range(1, 13) for r in range(1, 9)} <= full


def test_an_mpp_near_a_level_reads_it_as_stored_and_one_finer_than_level_0_is_refused(slides):
    with open_slide(slides.good) as slide:
        near = scale_for_mpp(slide, 0.49, TILE)  # 2% off level 0: a scanner's rounding, read as stored
        assert (near.level, near.read, near.mpp, near.name) == (0, TILE, 0.5, "0.49mpp")
        with pytest.raises(DataError, match=r"field 'mpp': 0.45 um/px is finer than the slide's level 0 .0.5 um/px"):
            scale_for_mpp(slide, 0.45, TILE)
        assert scale_for_mpp(slide, 0.45, TILE, tolerance=0.2).level == 0


def test_a_scale_between_levels_is_read_from_the_finer_level_and_resized(slides, tmp_path):
    run_stage(WSIStage(slides=str(slides.good), mpp=[0.75], tile=TILE, details=0), None, tmp_path / "o")
    rows = _rows(tmp_path / "o", "tile")
    level0 = _level(slides.good, 0)
    assert rows and all(r["level"] == 0 and r["downsample"] == 1.5 and r["mpp"] == 0.75 for r in rows)
    for row in rows[:5]:  # 96 level-0 pixels a side, resized to 64 with Lanczos
        region = level0[row["y"]:row["y"] + 96, row["x"]:row["x"] + 96]
        expected = np.asarray(Image.fromarray(region).resize((TILE, TILE), Image.Resampling.LANCZOS))
        assert row["x"] % 96 == 0 and np.array_equal(_pixels(tmp_path / "o", row["images"][0]), expected)


def test_multiscale_rows_hold_details_inside_their_context(tiled):
    rows = [r for r in _rows(tiled, "multiscale") if r["slide"] == "good/good.tif"]
    assert rows and all(len(r["images"]) == 5 for r in rows)  # a context and 4 details (--details default)
    for row in rows:
        context = _pixels(tiled, row["images"][0])
        for image, (x1, y1, x2, y2) in zip(row["images"][1:], row["detail_boxes"], strict=True):
            assert (x2 - x1, y2 - y1) == (TILE / 4, TILE / 4)  # 0.5 um/px in a 2 um/px tile
            # the detail shrunk by the slide's own pyramid step is the context's crop at its box
            shrunk = pyramid(_pixels(tiled, image), 3)[2]
            assert np.array_equal(shrunk, context[int(y1):int(y2), int(x1):int(x2)])


@pytest.mark.parametrize(("name", "flags", "field", "reason"), [
    ("no_mpp", ["--mpp", "0.5"], "mpp", "no microns per pixel: the slide states none"),
    ("good", ["--levels", "0", "5"], "level", "level 5: the slide has levels 0-2"),
    ("broken_level", ["--mpp", "2.0"], "level", "level 2: unreadable tile data"),
    ("not_a_slide", [], None, "unreadable slide: OpenSlide: Unsupported or missing image file; tifffile:"),
    ("blank", [], "tissue", "no tissue"),
])
def test_a_bad_slide_stops_the_stage_in_one_line(slides, tmp_path, capsys, name, flags, field, reason):
    path = getattr(slides, name)
    argv = ["curate", "wsi", "--slides", str(path.parent), *flags, "--tile", str(TILE), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    where = f"{path}: field '{field}': " if field else f"{path}: "
    assert err.startswith(f"error: {where}{reason}") and "\n" not in err and not (tmp_path / "o").exists()


def test_skipped_slides_are_in_rejects_with_their_reason(slides, tiled):
    rejects = {Path(r["file"]).name: r for r in _rows(tiled, "rejects")}
    assert sorted(rejects) == ["blank.tif", "broken_level.tif", "no_mpp.tif", "not_a_slide.tif"]
    assert rejects["no_mpp.tif"]["field"] == "mpp" and rejects["blank.tif"]["field"] == "tissue"
    counts = json.loads((tiled / "manifest.json").read_text())["counts"]
    assert (counts["slides"], counts["tiled"], counts["skipped"]) == (6, 2, 4)


def test_a_slide_without_mpp_is_tiled_by_level(slides, tmp_path):
    run_stage(WSIStage(slides=str(slides.no_mpp), levels=[1], tile=TILE), None, tmp_path / "o")
    rows = _rows(tmp_path / "o", "tile")
    level1 = _level(slides.no_mpp, 1)
    assert rows and all(r["mpp"] is None and r["level"] == 1 and r["downsample"] == 2.0 for r in rows)
    row = rows[0]
    assert np.array_equal(_pixels(tmp_path / "o", row["images"][0]),
                          level1[row["y"] // 2:row["y"] // 2 + TILE, row["x"] // 2:row["x"] // 2 + TILE])


def _clip(box, x0, y0, side0, factor):
    """A rectangle's box in a tile's pixels, by hand: intersect, shift, scale."""
    x1, y1, x2, y2 = max(box[0], x0), max(box[1], y0), min(box[2], x0 + side0), min(box[3], y0 + side0)
    return None if x2 <= x1 or y2 <= y1 else [(x1 - x0) / factor, (y1 - y0) / factor, (x2 - x0) / factor,
                                                (y2 - y0) / factor]


def test_grounding_rows_box_each_region_the_tile_shows(slides, tiled):
    tiles = {r["id"]: r for r in _rows(tiled, "tile") if r["slide"] == "good/good.tif"}
    grounding = [r for r in _rows(tiled, "grounding")]
    assert grounding and all(r["id"].split("#")[0] in tiles for r in grounding)  # only the slide with a GeoJSON
    got = {r["id"]: r for r in grounding}
    for tile in tiles.values():
        side0 = TILE * tile["downsample"]
        expected: dict[str, list] = {}
        for label, box in slides.regions:  # the blocks the fixture drew, in level-0 pixels
            clipped = _clip(box, tile["x"], tile["y"], side0, tile["downsample"])
            if clipped and min(clipped[2] - clipped[0], clipped[3] - clipped[1]) >= 4:
                expected.setdefault(label, []).append(clipped)
        for label, boxes in expected.items():
            row = got.pop(f"{tile['id']}#{label}")
            assert [b["bbox"] for b in row["boxes"]] == boxes and {b["label"] for b in row["boxes"]} == {label}
            assert row["image"] == tile["images"][0] and row["image_size"] == [TILE, TILE]
            assert row["question"] == f"Locate every {label} region in this image. Answer with a box for each."
    assert not got  # no box the regions do not give
    for i, row in enumerate(grounding[:20], start=1):  # the ground floor's grounding record reads them as they are
        record = parse_record(row, "grounding", path=tiled / "grounding.jsonl", row=i, base_dir=tiled)
        assert record.images == [str(tiled / row["image"])] and record.image_size == (TILE, TILE)
    per_tile = Counter(r["id"].split("#")[0] for r in grounding if "@2mpp/" in r["id"])
    assert max(per_tile.values()) >= 2  # a context tile shows several tissues: a row (a question) for each


def test_geojson_shapes_clip_to_the_part_inside_the_tile(tmp_path):
    triangle = [[[0, 0], [100, 0], [0, 100], [0, 0]]]
    ell = [[[0, 0], [60, 0], [60, 20], [20, 20], [20, 60], [0, 60], [0, 0]]]
    path = tmp_path / "a.geojson"
    data = geojson([("Tumor", [triangle]), ("Stroma", [ell]), ("Mucin", [ring((10, 10, 14, 14)),
                                                                         ring((40, 40, 50, 50))])], point=(5, 5))
    del data["features"][1]["properties"]["classification"]  # unclassified: the generic label
    path.write_text(json.dumps(data))
    regions = read_geojson(path)
    assert [r.label for r in regions] == ["Tumor", "region", "Mucin"]  # the point has no area
    index = RegionIndex(regions)
    # tile x 50..150, y 0..100 at 2 level-0 px per tile px: the triangle's part is (50,0)-(100,0)-(50,50)
    assert index.boxes(50, 0, 100, 2.0) == [{"bbox": [0.0, 0.0, 25.0, 25.0], "label": "Tumor"},
                                            {"bbox": [0.0, 0.0, 5.0, 10.0], "label": "region"}]
    # tile x 30..60, y 0..30: wholly under the triangle's edge x + y = 100; the L's top bar gives (30,0)-(60,20)
    assert index.boxes(30, 0, 30, 1.0) == [{"bbox": [0.0, 0.0, 30.0, 30.0], "label": "Tumor"},
                                           {"bbox": [0.0, 0.0, 30.0, 20.0], "label": "region"}]
    # tile x 30..60, y 30..60: the L is outside, one mucin square inside; min_box drops that 10-px square
    assert index.boxes(30, 30, 30, 1.0) == [{"bbox": [0.0, 0.0, 30.0, 30.0], "label": "Tumor"},
                                            {"bbox": [10.0, 10.0, 20.0, 20.0], "label": "Mucin"}]
    assert [b["label"] for b in index.boxes(30, 30, 30, 1.0, min_box=12)] == ["Tumor"]
    # a tile that sees both squares of the MultiPolygon: a box for each part, not one around both
    assert [b["bbox"] for b in index.boxes(5, 5, 50, 1.0) if b["label"] == "Mucin"] == [[5.0, 5.0, 9.0, 9.0],
                                                                                         [35.0, 35.0, 45.0, 45.0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {
        "type": "Polygon", "coordinates": "nope"}}]}))
    with pytest.raises(DataError, match=r"a.geojson:1: field 'geometry': not a GeoJSON geometry"):
        read_geojson(path)


def test_a_rerun_tiles_only_the_slides_not_done(slides, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slides.good, folder / "a.tif")
    stage = WSIStage(slides=str(folder), mpp=[2.0], tile=TILE)
    first = run_stage(stage, None, tmp_path / "o")
    assert (first.counts["tiled"], first.counts["reused"]) == (1, 0)
    assert run_stage(stage, None, tmp_path / "o").created == first.created  # same inputs: the stage is skipped
    (part,) = parts_folder(tmp_path / "o").iterdir()
    stamp = (part / DONE).stat().st_mtime_ns
    shutil.copy(slides.subifds, folder / "b.tif")  # a slide added: the stage runs again, the first slide does not
    second = run_stage(stage, None, tmp_path / "o")
    assert (second.counts["tiled"], second.counts["reused"], second.counts["slides"]) == (1, 1, 2)
    assert (part / DONE).stat().st_mtime_ns == stamp
    rows = _rows(tmp_path / "o", "tile")
    assert {r["slide"] for r in rows} == {"a.tif", "b.tif"}
    assert all((tmp_path / "o" / r["images"][0]).is_file() for r in rows)


def test_a_process_pool_writes_what_one_process_writes(slides, tmp_path):
    stage = WSIStage(slides=str(slides.good), mpp=[2.0], tile=TILE)
    run_stage(stage, None, tmp_path / "local", engine="local")
    run_stage(stage, None, tmp_path / "pool", engine="processes")
    for kind in ("tile", "grounding"):
        assert (tmp_path / "local" / f"{kind}.jsonl").read_bytes() == (tmp_path / "pool" / f"{kind}.jsonl").read_bytes()
