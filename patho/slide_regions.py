"""Regions drawn on a whole slide, in slide coordinates, turned into boxes in a tile's own pixels.

The input is GeoJSON as QuPath exports annotations (File > Object data > Export as GeoJSON, or
`exportObjectsToGeoJson(annotations, path, "FEATURE_COLLECTION")`): a FeatureCollection (or a bare list of Features,
QuPath's export without FEATURE_COLLECTION, or one Feature) whose geometries are in pixels of the full-resolution
image, origin at its top-left corner, and whose class is `properties.classification.name`
(`qupath/qupath-docs:docs/advanced/exporting_annotations.md`, commit de453e8).  Polygons and MultiPolygons become
boxes; points and lines (cell counts, rulers) have no area and are left out.

    regions = read_geojson("case1.geojson")
    index = RegionIndex(regions)
    index.boxes(x0, y0, side0, factor)   # [{"bbox": [x1, y1, x2, y2], "label": "Tumor"}] in the tile's pixels

A box is the bounding box of a piece of the region inside the tile (shapely's intersection), one box per separate
piece: an L-shaped region that only grazes a tile gets the box of what the tile shows, not its whole bounding box
clipped, and a MultiPolygon (a region drawn in several parts) or a U that the tile cuts in two gives a box per part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from patho_r1.errors import DataError

UNLABELLED = "region"  # an annotation QuPath exported without a classification


@dataclass(frozen=True)
class Region:
    label: str
    geometry: object  # a shapely Polygon or MultiPolygon, level-0 pixels


def read_geojson(path: str | Path) -> list[Region]:
    """The areal annotations of a GeoJSON file; a feature that is not GeoJSON raises a DataError naming the file,
    the feature (1-based) and the field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, None, None, f"not a GeoJSON file ({type(exc).__name__}: {exc})") from None
    features = _features(data)
    if features is None:
        raise DataError(path, None, "type", "expected a FeatureCollection, a list of Features or a Feature")
    regions = []
    for n, feature in enumerate(features, start=1):
        region = _region(feature, path, n)
        if region is not None:
            regions.append(region)
    return regions


def _features(data) -> list | None:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
        return data["features"]
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    return None


def _region(feature, path: Path, n: int) -> Region | None:
    from shapely import make_valid
    from shapely.geometry import shape

    if not isinstance(feature, dict):
        raise DataError(path, n, None, f"a feature must be a JSON object, not {type(feature).__name__}")
    if feature.get("geometry") is None:  # GeoJSON's unlocated feature: nothing to box
        return None
    if not isinstance(feature["geometry"], dict):
        raise DataError(path, n, "geometry", "not a GeoJSON geometry object")
    try:
        geometry = shape(feature["geometry"])
    except Exception as exc:  # shapely raises GeometryTypeError, ValueError, TypeError, KeyError on bad input
        raise DataError(path, n, "geometry", f"not a GeoJSON geometry ({type(exc).__name__}: {exc})") from None
    if geometry.geom_type not in ("Polygon", "MultiPolygon"):
        return None
    if not geometry.is_valid:  # a self-crossing outline drawn by hand: its valid equivalent
        geometry = make_valid(geometry)
    return Region(_label(feature.get("properties")), geometry) if geometry.area > 0 else None


def _label(properties) -> str:
    if not isinstance(properties, dict):
        return UNLABELLED
    classification = properties.get("classification")
    if isinstance(classification, dict) and isinstance(classification.get("name"), str):
        return classification["name"]
    return properties["name"] if isinstance(properties.get("name"), str) else UNLABELLED


class RegionIndex:
    """The regions of one slide, searchable by tile (shapely's STRtree)."""

    def __init__(self, regions: list[Region]):
        from shapely import STRtree

        self.regions = regions
        self._tree = STRtree([r.geometry for r in regions])

    def boxes(self, x0: float, y0: float, side0: float, factor: float, min_box: float = 0.0) -> list[dict]:
        """Boxes of the regions inside the tile whose level-0 square starts at (x0, y0) with side `side0`, in tile
        pixels (`factor` level-0 pixels each), in the order of the file, one per separate piece; a box under
        `min_box` pixels wide or high is left out."""
        from shapely import get_parts
        from shapely.geometry import box

        tile = box(x0, y0, x0 + side0, y0 + side0)
        out = []
        for i in sorted(int(i) for i in self._tree.query(tile)):
            for part in get_parts(self.regions[i].geometry.intersection(tile)):
                if part.is_empty or part.area <= 0:  # an edge or a corner shared with the tile
                    continue
                bx1, by1, bx2, by2 = part.bounds
                bbox = [round((bx1 - x0) / factor, 2), round((by1 - y0) / factor, 2),
                        round((bx2 - x0) / factor, 2), round((by2 - y0) / factor, 2)]
                if bbox[2] - bbox[0] >= max(min_box, 1e-9) and bbox[3] - bbox[1] >= max(min_box, 1e-9):
                    out.append({"bbox": bbox, "label": self.regions[i].label})
        return out
