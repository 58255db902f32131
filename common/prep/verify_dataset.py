"""Check a preprocessed dataset against its raw data: schema, and recomputed rows column by column.

Tolerances: uint8, bool and string columns must match exactly. Float columns are compared by
maximum absolute difference: ``FLOAT_TOLERANCE`` for the maps and normalized ellipse values
(float32 rounding of identical computations is exact; the margin absorbs OpenCV builds whose
distance transform or ellipse fit differ in the last bits), ``ANGLE_TOLERANCE`` degrees for the angle.

A dataset written by the original precompute (the published ``Conner/sddec25-01``) has no
``angle`` column and no manifest: only the columns it stores are compared, and its rows are
recomputed at the size its ``image`` column declares.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from datasets import Dataset, Features

from common.prep.build_dataset import SampleOptions, load_row
from common.prep.openeds_source import RawSample
from common.prep.preprocess import SkipSample
from common.schema import DATA_DIR, EXTRA_COLUMNS, MANIFEST_NAME, dataset_features, image_size_of

FLOAT_TOLERANCE = 1e-5
ANGLE_TOLERANCE = 1e-3
EXACT_COLUMNS = ("image", "label", "filename", "preprocessed")


def tolerance_for(column: str) -> float:
    if column in EXACT_COLUMNS:
        return 0.0
    return ANGLE_TOLERANCE if column == "angle" else FLOAT_TOLERANCE


@dataclass
class ColumnCheck:
    rows: int = 0
    max_diff: float = 0.0
    failures: list[str] = field(default_factory=list)


@dataclass
class ValidationReport:
    schema_errors: list[str] = field(default_factory=list)
    row_errors: list[str] = field(default_factory=list)
    columns: dict[str, ColumnCheck] = field(default_factory=dict)
    not_stored: set[str] = field(default_factory=set)  # extra columns the dataset lacks; not compared

    @property
    def ok(self) -> bool:
        checked = any(c.rows for c in self.columns.values())
        return checked and not self.schema_errors and not self.row_errors and not any(
            c.failures for c in self.columns.values()
        )

    def render(self) -> str:
        lines = ["column           rows  max |diff|   tolerance  status"]
        for name, check in self.columns.items():
            status = "ok" if not check.failures else f"MISMATCH in {len(check.failures)} rows"
            tol = tolerance_for(name)
            lines.append(f"{name:<15} {check.rows:>5}  {check.max_diff:>10.3g}  {tol:>10.3g}  {status}")
            lines.extend(f"    {failure}" for failure in check.failures[:5])
        for name in sorted(self.not_stored):
            lines.append(f"{name:<15} not stored by this dataset; not compared")
        lines.extend(f"schema: {error}" for error in self.schema_errors)
        lines.extend(f"row: {error}" for error in self.row_errors)
        lines.append("RESULT: " + ("all checked rows match" if self.ok else "FAILED"))
        return "\n".join(lines)


def check_schema(features: Features, report: ValidationReport) -> tuple[int, int] | None:
    """Compare a shard's declared Features with the expected schema for its image size.

    Returns the (H, W) of the ``image`` column, or None when there is none to recompute against.
    """
    try:
        size = image_size_of(features)
    except (KeyError, AttributeError):
        report.schema_errors.append(f"no Array2D 'image' column; columns are {list(features)}")
        return None
    expected = dataset_features(*size)
    for name in sorted(set(expected) | set(features)):
        if name in EXTRA_COLUMNS and name not in features:
            report.not_stored.add(name)
        elif features.get(name) != expected.get(name):
            report.schema_errors.append(f"{name}: found {features.get(name)}, expected {expected.get(name)}")
    return size


def _compare(name: str, stored, fresh, check: ColumnCheck, filename: str) -> None:
    check.rows += 1
    if name in ("filename", "preprocessed"):
        if stored != fresh:
            check.failures.append(f"{filename}: {stored!r} != {fresh!r}")
        return
    stored, fresh = np.asarray(stored, np.float64), np.asarray(fresh, np.float64)
    if stored.shape != fresh.shape:
        check.failures.append(f"{filename}: shape {stored.shape} != {fresh.shape}")
        return
    diff = float(np.max(np.abs(stored - fresh))) if stored.size else 0.0
    check.max_diff = max(check.max_diff, diff)
    if not diff <= tolerance_for(name):  # also catches NaN
        check.failures.append(f"{filename}: max |diff| {diff:.3g}")


def sample_rows(files: list[Path], count: int, rng: random.Random):
    """Yield ``count`` random rows (as dicts of numpy values) from a split's parquet files."""
    index = []  # (path, row group, row within the group) of every row
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for group in range(meta.num_row_groups):
            index.extend((path, group, row) for row in range(meta.row_group(group).num_rows))
    for path, group, row in sorted(rng.sample(index, min(count, len(index)))):
        table = pq.ParquetFile(path).read_row_group(group).slice(row, 1)
        yield Dataset(table).with_format("numpy")[0]


def validate_split(files, raw: dict[str, RawSample], options, count, rng, report) -> None:
    """Recompute ``count`` random rows of one split from raw and compare every column."""
    for stored in sample_rows(files, count, rng):
        filename = str(stored["filename"])
        if filename not in raw:
            report.row_errors.append(f"{filename}: no raw sample with this name")
            continue
        try:
            fresh, _ = load_row(raw[filename], options)
        except SkipSample as exc:
            report.row_errors.append(f"{filename}: raw sample is now skipped ({exc})")
            continue
        for name in fresh:
            if name in stored:  # a missing required column is already a schema error
                check = report.columns.setdefault(name, ColumnCheck())
                _compare(name, stored[name], fresh[name], check, filename)


def saved_options(root: Path) -> SampleOptions | None:
    """The options a dataset was made with, from our manifest; None for a dataset without one."""
    path = root / MANIFEST_NAME
    record = json.loads(path.read_text()).get("options") if path.exists() else None
    return SampleOptions.from_record(record) if record else None


def validate_dataset(root, raw_by_split: dict[str, list[RawSample]], count: int = 20, seed: int = 0,
                     options: SampleOptions | None = None) -> ValidationReport:
    """Validate a local dataset folder (Hub datasets are downloaded to one first)."""
    root, report, rng = Path(root), ValidationReport(), random.Random(seed)
    options = options or saved_options(root)
    for split, samples in raw_by_split.items():
        files = sorted((root / DATA_DIR).glob(f"{split}-*.parquet"))
        if not files:
            report.schema_errors.append(f"split '{split}' has no shards under {root / DATA_DIR}")
            continue
        size = check_schema(Features.from_arrow_schema(pq.read_schema(files[0])), report)
        if size is None:
            continue
        # without a manifest (the original's output) rows are recomputed at the stored frame size
        split_options = options or SampleOptions(height=size[0], width=size[1])
        if size != (split_options.height, split_options.width):
            report.schema_errors.append(
                f"split '{split}': image size {size[0]}x{size[1]} differs from the expected "
                f"{split_options.height}x{split_options.width}")
        validate_split(files, {s.name: s for s in samples}, split_options, count, rng, report)
    return report
