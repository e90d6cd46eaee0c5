"""Whole-slide images: open a pyramidal slide, read its levels, downsamples and microns per pixel, read a region at a
level, find the tissue on its thumbnail, and lay a tile grid over it at a chosen magnification.

    with open_slide("case1.svs") as slide:
        slide.levels, slide.downsamples, slide.mpp       # [(w, h), ...], [1.0, 4.0, ...], (0.25, 0.25) or None
        scale = scale_for_mpp(slide, 0.5, tile=224)      # which level to read, and how much of it per tile
        slide.read_region(x, y, scale.level, w, h)       # RGB uint8; x, y in level-0 pixels, w, h at the level

OpenSlide reads the vendor formats (SVS, NDPI, MRXS, SCN, ...) and generic tiled TIFF; tifffile is the fallback for
the pyramidal TIFFs OpenSlide cannot open or sees only part of: a stripped (untiled) pyramid, which OpenSlide refuses,
and a pyramid stored as SubIFDs, where OpenSlide 4.0 finds level 0 only (it walks the top-level directory chain:
`openslide/openslide:src/openslide-vendor-generic-tiff.c`, commit e6cd2d7).  What we checked is in docs/slides.md.

Bad slides raise a `DataError` naming the slide and one line of reason: unreadable, no microns per pixel (when a
magnification is asked in microns), a level it does not have or cannot decode, no tissue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patho_r1.errors import DataError

# What OpenSlide reads (https://openslide.org/formats/), plus plain TIFF for the tifffile fallback.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide")
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (TIFF 6.0, tag 296)
MAX_WHOLE_LEVEL = 1 << 30  # pixels of one level the tifffile fallback decodes at once (3 GiB of RGB)
# Relative difference under which a level *is* the MPP asked for and is read as stored (no resampling): scanners
# state their "0.25 um/px" as 0.2527 or 0.2465.
MPP_TOLERANCE = 0.05


class Slide:
    """An open slide.  `levels`: (width, height) per level, level 0 the largest; `downsamples`: level-0 pixels per
    level pixel; `mpp`: (x, y) microns per level-0 pixel, or None where the slide states none; `reader`: openslide
    or tifffile."""

    def __init__(self, path: Path, reader: str, backend, levels, downsamples, mpp):
        self.path, self.reader, self._backend = Path(path), reader, backend
        self.levels: list[tuple[int, int]] = [tuple(map(int, d)) for d in levels]
        self.downsamples: list[float] = [float(d) for d in downsamples]
        self.mpp: tuple[float, float] | None = mpp

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def check_level(self, level: int) -> None:
        if not 0 <= level < len(self.levels):
            raise DataError(self.path, None, "level", f"level {level}: the slide has levels 0-{len(self.levels) - 1}")

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3): `width` x `height` pixels of `level` from level-0 point (x, y)."""
        self.check_level(level)
        try:
            return self._backend.read(x, y, level, width, height)
        except Exception as exc:  # OpenSlideError, zlib.error, ValueError...: the tile data does not decode
            raise DataError(self.path, None, "level", f"level {level}: unreadable tile data "
                            f"({type(exc).__name__}: {_first_line(exc)})") from None

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide as RGB, its longer side at most `max_side` pixels."""
        try:
            return self._backend.thumbnail(max_side)
        except Exception as exc:
            raise DataError(self.path, None, "thumbnail", f"unreadable tile data ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp[0] * self.downsamples[level]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""


class _OpenSlideBackend:
    def __init__(self, handle):
        self.handle = handle

    def read(self, x, y, level, width, height) -> np.ndarray:
        return _rgba_on_white(np.asarray(self.handle.read_region((x, y), level, (width, height))))

    def thumbnail(self, max_side: int) -> np.ndarray:
        return np.asarray(self.handle.get_thumbnail((max_side, max_side)).convert("RGB"))

    def close(self) -> None:
        self.handle.close()


def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside the scanned area) over white, as its own `get_thumbnail` does; opaque
    pixels are unchanged."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    if alpha.min() == 255:
        return np.ascontiguousarray(rgba[..., :3])
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


class _TiffBackend:
    """tifffile over the first series' levels.  Without zarr, tifffile decodes a whole level at once, so the level
    last read is kept: fine for the levels a tiler walks one after another, not for level 0 of a 100k-pixel slide
    (OpenSlide reads those tile by tile)."""

    def __init__(self, tif, series):
        self.tif, self.series = tif, series
        self._cached: tuple[int, np.ndarray] | None = None

    def level(self, level: int) -> np.ndarray:
        shape = self.series.levels[level].shape
        if shape[0] * shape[1] > MAX_WHOLE_LEVEL:
            raise ValueError(f"{shape[1]}x{shape[0]} pixels: over the {MAX_WHOLE_LEVEL:,} the tifffile fallback "
                             "decodes at once; convert the slide to a tiled pyramid OpenSlide reads")
        if self._cached is None or self._cached[0] != level:
            self._cached = None  # the old level goes before the new one is decoded
            self._cached = (level, _as_rgb(self.series.levels[level].asarray()))
        return self._cached[1]

    def read(self, x, y, level, width, height) -> np.ndarray:
        arr = self.level(level)
        full = self.series.levels[0].shape
        lx, ly = int(round(x * arr.shape[1] / full[1])), int(round(y * arr.shape[0] / full[0]))
        out = np.full((height, width, 3), 255, np.uint8)  # outside the image: white, as OpenSlide's is clear
        part = arr[max(ly, 0):ly + height, max(lx, 0):lx + width]
        out[max(-ly, 0):max(-ly, 0) + part.shape[0], max(-lx, 0):max(-lx, 0) + part.shape[1]] = part
        return out

    def thumbnail(self, max_side: int) -> np.ndarray:
        from PIL import Image

        im = Image.fromarray(self.level(len(self.series.levels) - 1))
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return np.asarray(im)

    def close(self) -> None:
        self._cached = None
        self.tif.close()


def _as_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"not an 8-bit RGB image ({arr.dtype}, shape {arr.shape})")
    return np.ascontiguousarray(arr[..., :3])


def open_slide(path: str | Path) -> Slide:
    """Open a slide with OpenSlide, else tifffile; a slide neither opens raises a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "unreadable slide: not a file")
    opened, why = _with_openslide(path)
    if opened is None or (len(opened.levels) == 1 and path.suffix.lower() in (".tif", ".tiff")):
        fallback, why_not = _with_tifffile(path)
        if fallback is not None and (opened is None or len(fallback.levels) > len(opened.levels)):
            if opened is not None:
                opened.close()  # a SubIFD pyramid: OpenSlide sees level 0 only
            return fallback
        if fallback is not None:
            fallback.close()
        if opened is None:
            raise DataError(path, None, None, f"unreadable slide: OpenSlide: {why}; tifffile: {why_not}")
    return opened


def _with_openslide(path: Path) -> tuple[Slide | None, str]:
    try:
        import openslide
    except (ImportError, OSError) as exc:  # the wheel, or the library it loads, is missing
        return None, f"not available ({_first_line(exc)})"
    try:
        handle = openslide.OpenSlide(str(path))
    except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
        return None, _first_line(exc) or type(exc).__name__
    props = handle.properties
    mpp = _mpp(props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y))
    return Slide(path, "openslide", _OpenSlideBackend(handle), handle.level_dimensions, handle.level_downsamples,
                 mpp), ""


def _mpp(x, y) -> tuple[float, float] | None:
    try:
        mx, my = float(x), float(y if y is not None else x)
    except (TypeError, ValueError):
        return None
    return (mx, my) if mx > 0 and my > 0 and math.isfinite(mx) and math.isfinite(my) else None


def _with_tifffile(path: Path) -> tuple[Slide | None, str]:
    import logging

    import tifffile

    logging.getLogger("tifffile").setLevel(logging.ERROR)  # its warnings on a broken file: our one line says it
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        return None, _first_line(exc) or type(exc).__name__
    if not tif.series or not tif.pages:
        tif.close()
        return None, "no image in the file"
    series = tif.series[0]
    dims = [(lv.shape[1], lv.shape[0]) for lv in series.levels]
    downsamples = [dims[0][0] / d[0] for d in dims]
    mpp = _tiff_mpp(series.levels[0].pages[0])
    return Slide(path, "tifffile", _TiffBackend(tif, series), dims, downsamples, mpp), ""


def _tiff_mpp(page) -> tuple[float, float] | None:
    """Microns per pixel from XResolution / YResolution (pixels per ResolutionUnit), as OpenSlide reads them."""
    tags = page.tags
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2  # TIFF's default unit is the inch
    if unit not in _UM_PER_UNIT or "XResolution" not in tags:
        return None
    x, y = (tags[name].value for name in ("XResolution", "YResolution"))
    try:
        per_x, per_y = x[0] / x[1], y[0] / y[1]
    except (TypeError, ZeroDivisionError, IndexError):
        return None
    return _mpp(_UM_PER_UNIT[unit] / per_x, _UM_PER_UNIT[unit] / per_y) if per_x > 0 and per_y > 0 else None


# ---------------------------------------------------------------------------------------------------------------------
# Tissue on the thumbnail
# ---------------------------------------------------------------------------------------------------------------------

MIN_SATURATION = 0.05  # HSV saturation under which a pixel is glass however Otsu splits the histogram


def tissue_mask(rgb: np.ndarray, min_saturation: float = MIN_SATURATION, min_object: float = 1e-3) -> np.ndarray:
    """Tissue pixels of a thumbnail: Otsu's threshold on HSV saturation (stained tissue is coloured, glass and
    background are grey or white), at least `min_saturation`; specks under `min_object` of the thumbnail's area
    dropped and holes of that size filled (fat vacuoles, lumens).  All False on a blank slide."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    saturation = rgb2hsv(rgb[..., :3])[..., 1]
    if float(saturation.max()) < min_saturation:
        return np.zeros(saturation.shape, bool)
    mask = saturation > max(float(threshold_otsu(saturation)), min_saturation)
    size = max(int(min_object * mask.size), 1)
    mask = remove_small_objects(mask, max_size=size)
    return remove_small_holes(mask, max_size=size)


# ---------------------------------------------------------------------------------------------------------------------
# Scales and the tile grid
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scale:
    """One magnification to tile at: read `read` x `read` pixels of `level` per tile (resized to the tile when they
    differ), each tile covering `read * downsamples[level]` level-0 pixels.  `mpp`: microns per tile pixel, as the
    slide states them (None: tiled by level on a slide that states none); `asked`: the MPP asked for, which names
    the scale."""

    level: int
    read: int
    tile: int
    mpp: float | None
    downsample: float  # level-0 pixels per pixel of `level`
    asked: float | None = None

    @property
    def factor(self) -> float:
        """Level-0 pixels per tile pixel."""
        return self.downsample * self.read / self.tile

    @property
    def name(self) -> str:
        return f"{self.asked:g}mpp" if self.asked is not None else f"L{self.level}"


def scale_for_level(slide: Slide, level: int, tile: int) -> Scale:
    slide.check_level(level)
    return Scale(level, tile, tile, slide.level_mpp(level), slide.downsamples[level])


def scale_for_mpp(slide: Slide, mpp: float, tile: int, tolerance: float = MPP_TOLERANCE) -> Scale:
    """The coarsest level at least as fine as `mpp`, read as stored where its MPP is within `tolerance` (relative)
    of `mpp` (a scanner's 0.2527 um/px is its "0.25"), else a larger square of it resized down to the tile."""
    if slide.mpp is None:
        raise DataError(slide.path, None, "mpp", "no microns per pixel: the slide states none (no openslide.mpp-x "
                        "property, no TIFF resolution tags); tile it by level (--levels) instead of --mpp")
    mpps = [slide.level_mpp(i) for i in range(len(slide.levels))]
    finer = [i for i, m in enumerate(mpps) if m <= mpp * (1 + tolerance)]
    if not finer:
        raise DataError(slide.path, None, "mpp", f"{mpp:g} um/px is finer than the slide's level 0 "
                        f"({mpps[0]:.4g} um/px, more than {tolerance:.0%} off)")
    level = max(finer, key=lambda i: mpps[i])
    read = tile if abs(mpps[level] - mpp) <= tolerance * mpp else int(round(tile * mpp / mpps[level]))
    return Scale(level, read, tile, round(mpps[level] * read / tile, 6), slide.downsamples[level], asked=mpp)


@dataclass(frozen=True)
class TileSpot:
    """A tile of the grid: its level-0 origin (x, y), its column and row, and its share of tissue."""

    x: int
    y: int
    col: int
    row: int
    tissue: float


def tile_grid(slide: Slide, scale: Scale, mask: np.ndarray, min_tissue: float) -> list[TileSpot]:
    """The whole tiles of `scale` (from the level-0 origin, without overlap) whose footprint on the tissue `mask` (a
    thumbnail's) is at least `min_tissue` tissue, in row-major order."""
    width, height = slide.levels[scale.level]
    sx, sy = slide.levels[0][0] / mask.shape[1], slide.levels[0][1] / mask.shape[0]
    side0 = scale.read * scale.downsample  # level-0 pixels a tile covers
    spots = []
    for row in range(height // scale.read):
        for col in range(width // scale.read):
            x, y = int(round(col * side0)), int(round(row * side0))
            window = mask[int(y / sy):max(math.ceil((y + side0) / sy), int(y / sy) + 1),
                          int(x / sx):max(math.ceil((x + side0) / sx), int(x / sx) + 1)]
            share = float(window.mean()) if window.size else 0.0
            if share >= min_tissue and share > 0:
                spots.append(TileSpot(x, y, col, row, share))
    return spots


def read_tile(slide: Slide, scale: Scale, spot: TileSpot) -> np.ndarray:
    """A tile's RGB pixels: the region as the slide stores it at `scale.level`, resized (Lanczos) only when the
    scale is not a level."""
    region = slide.read_region(spot.x, spot.y, scale.level, scale.read, scale.read)
    if scale.read == scale.tile:
        return region
    from PIL import Image

    return np.asarray(Image.fromarray(region).resize((scale.tile, scale.tile), Image.Resampling.LANCZOS))
