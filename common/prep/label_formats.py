"""Polygon and RLE labels as pupil masks: YOLO segmentation files and COCO JSON.

YOLO segmentation (Ultralytics, Roboflow): one ``.txt`` per image, one object per line,
``class x1 y1 x2 y2 ...`` with at least 3 points normalized to 0..1 (x by the image width, y by
its height). An empty file is an image without objects.

COCO: ``images`` (``id``, ``file_name``, ``width``, ``height``), ``categories`` (``id``, ``name``)
and ``annotations`` (``image_id``, ``category_id``, ``segmentation``), where a segmentation is a
list of polygons ``[x1, y1, x2, y2, ...]`` in pixels, or a run-length encoding
``{"size": [h, w], "counts": ...}``: counts of alternating 0 and 1 pixels (0 first) in
column-major order, given as a list of integers or as COCO's compressed string
(``decode_rle_string``).

Pixel convention of every polygon (``polygon_mask`` is the one rasterizer): OpenCV's, the one
``preprocess.fit_ellipse`` and ``cv2.findContours`` use. The pixel in row y, column x has its
centre at (x, y); a vertex (x, y) in pixels (YOLO: x * W, y * H; COCO: as stored) is rounded to
the nearest pixel centre (halves up) and clipped into the frame, and ``cv2.fillPoly`` fills every
pixel inside the polygon or on its outline. A polygon traced through the centres of a mask's
outer pixels (``cv2.findContours``, which mask-to-polygon converters use) so fills that mask
again. COCO's own rasterizer reads coordinates as continuous with pixel corners at integers: along
the outline the two differ by at most half a pixel. The pupil mask is the union of every pupil
polygon and RLE of the frame, each filled on its own.

Errors (``FolderImportError``) name the file and the line (YOLO) or annotation (COCO).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.errors import UserError


class FolderImportError(UserError):
    """A folder dataset that cannot be imported as it is; the message says what to fix."""


# ----------------------------------------------------------------------------- rasterization
def polygon_mask(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Polygons [(N, 2) float (x, y) in pixels] -> (H, W) uint8 0/1 mask of their union (see the
    module docstring for the pixel convention)."""
    mask = np.zeros((height, width), np.uint8)
    limit = np.array([width - 1, height - 1])
    for points in polygons:
        vertices = np.clip(np.floor(np.asarray(points, np.float64) + 0.5), 0, limit).astype(np.int32)
        cv2.fillPoly(mask, [vertices], 1)
    return mask


# ----------------------------------------------------------------------------- YOLO
def read_yolo_polygons(path, pupil_class: int) -> list[np.ndarray]:
    """The ``pupil_class`` polygons of a YOLO segmentation label file, each (N, 2) normalized
    (x, y); [] for an empty file. Every line is checked, also those of other classes."""
    polygons = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        fields = line.split()
        if fields:
            class_id, points = _yolo_line(fields, f"{path}:{number}")
            if class_id == pupil_class:
                polygons.append(points)
    return polygons


def _read_text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FolderImportError(f"{path}: cannot read the label file ({exc.__class__.__name__})") from None


def _yolo_line(fields: list[str], where: str) -> tuple[int, np.ndarray]:
    """One label line -> (class index, (N, 2) normalized points)."""
    try:
        class_id = int(fields[0])
    except ValueError:
        raise FolderImportError(f"{where}: the class '{fields[0]}' is not an integer index") from None
    values = fields[1:]
    if len(values) == 4:
        raise FolderImportError(f"{where}: 4 numbers are a bounding box (YOLO detection); segmentation "
                                "labels are 'class x1 y1 x2 y2 x3 y3 ...' (export polygons, not boxes)")
    if len(values) < 6 or len(values) % 2:
        raise FolderImportError(f"{where}: expected 'class x1 y1 x2 y2 x3 y3 ...' (at least 3 points), "
                                f"got {len(values)} numbers after the class")
    try:
        coordinates = np.array(values, np.float64)
    except ValueError:
        raise FolderImportError(f"{where}: a coordinate is not a number") from None
    if not np.isfinite(coordinates).all() or coordinates.min() < 0 or coordinates.max() > 1:
        raise FolderImportError(f"{where}: coordinates must be normalized to 0..1 (x / width, y / height)")
    return class_id, coordinates.reshape(-1, 2)


def yolo_mask(path, pupil_class: int, height: int, width: int) -> np.ndarray:
    """The (H, W) uint8 0/1 pupil mask of a YOLO label file for an image of H x W."""
    polygons = read_yolo_polygons(path, pupil_class)
    return polygon_mask([points * (width, height) for points in polygons], height, width)


def yolo_class_names(root: Path) -> dict[int, str]:
    """{index: name} from ``data.yaml`` (``names``: a list or a mapping), else ``classes.txt``
    beside the labels (one name a line); {} when neither is there."""
    import yaml  # only for YOLO datasets that carry a data.yaml

    data_yaml = root / "data.yaml"
    if data_yaml.is_file():
        try:
            names = (yaml.safe_load(data_yaml.read_text()) or {}).get("names", {})
        except (yaml.YAMLError, AttributeError) as exc:
            raise FolderImportError(f"{data_yaml}: not a YOLO data.yaml ({exc.__class__.__name__})") from None
        return (dict(enumerate(names)) if isinstance(names, list)
                else {int(k): str(v) for k, v in names.items()})
    for classes in (root / "labels" / "classes.txt", root / "classes.txt"):
        if classes.is_file():
            return dict(enumerate(line.strip() for line in classes.read_text().splitlines() if line.strip()))
    return {}


def yolo_pupil_class(names: dict[int, str], pupil_class: int | str | None, label: str) -> int:
    """The class index of the pupil: ``pupil_class`` (an index, or a name in ``names``), else the
    class named ``label``, else 0."""
    if isinstance(pupil_class, int):
        return pupil_class
    wanted = label if pupil_class is None else pupil_class
    matches = [index for index, name in names.items() if name.lower() == wanted.lower()]
    if matches:
        return matches[0]
    if pupil_class is None:
        return 0
    known = ", ".join(f"{index} '{name}'" for index, name in names.items()) or "none (no data.yaml)"
    raise FolderImportError(f"no YOLO class named '{pupil_class}' (classes: {known}); "
                            "give --pupil-class INDEX")


# ----------------------------------------------------------------------------- COCO
@dataclass(frozen=True)
class CocoImage:
    id: int
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class CocoFile:
    """A checked COCO file: its images, categories, and each image's pupil segmentations."""

    path: str
    category: int  # the pupil's category id
    images: dict[int, CocoImage]
    categories: dict[int, str]
    regions: dict[int, list]  # image id -> [segmentation] of the pupil category

    def has_pupil(self, image_id: int) -> bool:
        """Whether the image's pupil mask is not empty (a polygon always fills a pixel)."""
        return any(isinstance(s, list) or any(_rle_counts(s, "")[1::2])
                   for s in self.regions.get(image_id, []))

    def mask(self, image_id: int, height: int, width: int) -> np.ndarray:
        """The (H, W) uint8 0/1 pupil mask of an image read at H x W (its size in the file)."""
        image = self.images[image_id]
        if (image.height, image.width) != (height, width):
            raise FolderImportError(f"{self.path}: image {image.file_name} is {height}x{width} on disk but "
                                    f"{image.height}x{image.width} in the annotations")
        polygons, mask = [], np.zeros((height, width), np.uint8)
        for segmentation in self.regions.get(image_id, []):
            if isinstance(segmentation, list):
                polygons += [np.asarray(p, np.float64).reshape(-1, 2) for p in segmentation]
            else:
                mask |= decode_rle(_rle_counts(segmentation, self.path), height, width, self.path)
        return mask | polygon_mask(polygons, height, width)


def load_coco(path, pupil_class: int | str | None, label: str) -> CocoFile:
    """Read and check a COCO file; the pupil is category ``pupil_class`` (an id or a name), else
    the category named ``label``, else the only category. Parsed once per process and file version."""
    stat = os.stat(path)
    return _load_coco(str(path), pupil_class, label, (stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _load_coco(path: str, pupil_class, label: str, stamp) -> CocoFile:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise FolderImportError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations",
                                                                                       "categories")):
        raise FolderImportError(f"{path}: a COCO file has 'images', 'annotations' and 'categories' lists")
    categories = {_integer(c, "id", f"{path}: category {i}"): str(c.get("name", ""))
                  for i, c in enumerate(data["categories"])}
    category = coco_category(categories, pupil_class, label, path)
    images = {}
    for index, entry in enumerate(data["images"]):
        where = f"{path}: image {index}"
        image = CocoImage(_integer(entry, "id", where), str(entry.get("file_name", "")),
                          _integer(entry, "height", where), _integer(entry, "width", where))
        if not image.file_name or image.height <= 0 or image.width <= 0:
            raise FolderImportError(f"{where}: needs a file_name and a positive width and height")
        images[image.id] = image
    regions: dict[int, list] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = (f"{path}: annotation {index} "
                 f"(id {annotation.get('id') if isinstance(annotation, dict) else '?'})")
        image_id = _integer(annotation, "image_id", where)
        if image_id not in images:
            raise FolderImportError(f"{where}: image_id {image_id} is not in 'images'")
        category_id = _integer(annotation, "category_id", where)
        if category_id not in categories:
            raise FolderImportError(f"{where}: category_id {category_id} is not in 'categories'")
        if category_id == category:
            segmentation = _check_segmentation(annotation.get("segmentation"), images[image_id], where)
            regions.setdefault(image_id, []).append(segmentation)
    return CocoFile(path, category, images, categories, regions)


def _integer(entry, key: str, where: str) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise FolderImportError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def coco_category(categories: dict[int, str], pupil_class: int | str | None, label: str, path) -> int:
    """The pupil's category id: ``pupil_class`` as an id or a name, else the category named
    ``label`` (case-insensitive), else the only category."""
    named = {name.lower(): cid for cid, name in categories.items()}
    if isinstance(pupil_class, int) and pupil_class in categories:
        return pupil_class
    if isinstance(pupil_class, str) and pupil_class.lower() in named:
        return named[pupil_class.lower()]
    if pupil_class is None and label.lower() in named:
        return named[label.lower()]
    if pupil_class is None and len(categories) == 1:
        return next(iter(categories))
    known = ", ".join(f"{cid} '{name}'" for cid, name in categories.items()) or "none"
    wanted = f"no category {pupil_class!r}" if pupil_class is not None else f"no category named '{label}'"
    raise FolderImportError(f"{path}: {wanted} (categories: {known}); give --pupil-class ID or NAME")


def _check_segmentation(segmentation, image: CocoImage, where: str):
    """A pupil annotation's segmentation, checked against its image: polygons or an RLE."""
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size != [image.height, image.width]:
            raise FolderImportError(f"{where}: RLE size {size} differs from the image's "
                                    f"[{image.height}, {image.width}] (height, width)")
        counts = _rle_counts(segmentation, where)  # decoded here too, so that a bad one is found up front
        if sum(counts) != image.height * image.width:
            raise FolderImportError(f"{where}: RLE counts sum to {sum(counts)}, not "
                                    f"{image.height}x{image.width} = {image.height * image.width} pixels")
        return segmentation
    if not isinstance(segmentation, list) or not segmentation:
        raise FolderImportError(f"{where}: no segmentation (a detection export?); export polygons or masks")
    for polygon in segmentation:
        if (not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in polygon)):
            raise FolderImportError(f"{where}: a polygon is [x1, y1, x2, y2, x3, y3, ...] "
                                    "(at least 3 points)")
        points = np.asarray(polygon, np.float64).reshape(-1, 2)
        if not np.isfinite(points).all() or points.min() < 0 or (points > (image.width, image.height)).any():
            raise FolderImportError(f"{where}: polygon points lie outside the "
                                    f"{image.width}x{image.height} image")
    return segmentation


def _rle_counts(segmentation: dict, where: str) -> list[int]:
    counts = segmentation.get("counts")
    if isinstance(counts, str):
        return decode_rle_string(counts, where)
    if isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                        for c in counts):
        return counts
    raise FolderImportError(f"{where}: RLE 'counts' must be a list of counts >= 0 or a compressed string")


def decode_rle_string(text: str, where: str = "RLE") -> list[int]:
    """COCO's compressed RLE string -> counts.

    Each count is a signed integer in 5-bit groups, least significant first, each group plus 48 as
    one character, with bit 0x20 meaning "another group follows" and bit 0x10 of the last group the
    sign; from the fourth count on, the stored value is the difference to the count two before.
    """
    counts, position = [], 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise FolderImportError(f"{where}: the compressed RLE string ends in the middle of a count")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise FolderImportError(f"{where}: character {text[position]!r} cannot be in a "
                                        "compressed RLE")
            value |= (group & 0x1F) << shift
            more, position, shift = bool(group & 0x20), position + 1, shift + 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            raise FolderImportError(f"{where}: the compressed RLE string decodes to a negative count")
        counts.append(value)
    return counts


def decode_rle(counts: list[int], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """RLE counts (0s first, column-major) -> (H, W) uint8 0/1 mask; the counts must cover it exactly."""
    if sum(counts) != height * width:
        raise FolderImportError(f"{where}: RLE counts sum to {sum(counts)}, not {height}x{width} = "
                                f"{height * width} pixels")
    values = np.arange(len(counts), dtype=np.int64) % 2  # 0, 1, 0, 1, ...
    return np.repeat(values.astype(np.uint8), counts).reshape(width, height).T.copy()
