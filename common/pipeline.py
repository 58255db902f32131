"""The precompute engine: raw samples -> preprocessed parquet shards, in parallel and resumable.

Each split's samples are sorted by name and cut into fixed-size shards. A shard is done when its
parquet file exists under ``data/`` and its record under ``.shards/`` lists exactly the inputs and
preprocessing parameters of the current run. Both files are written atomically (record first, then
the parquet), so a run killed at any point leaves no file a loader would accept as a shard, and a
rerun redoes only the shards that are not done.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import datasets
import numpy as np
import pyarrow
from datasets import Dataset
from tqdm import tqdm

from common.cli import UserError
from common.io import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temporaries
from common.preprocess import SkipSample, letterbox, preprocessing_params, process_sample
from common.raw_sources import RawSample, read_raw_sample
from common.schema import DATA_DIR, MANIFEST_NAME, STATE_DIR, dataset_card, dataset_features, shard_name


@dataclass(frozen=True)
class SampleOptions:
    """How raw samples become rows; part of every shard's record."""

    height: int = 400
    width: int = 640
    letterbox: bool = False  # fit other sizes into (height, width) instead of skipping them
    pupil_class: int = 3
    keep_empty: bool = False

    def record(self) -> dict:
        return {**self.__dict__, "preprocessing": preprocessing_params()}


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    count: int
    samples: tuple[RawSample, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


def plan_shards(samples: dict[str, list[RawSample]], shard_size: int) -> list[ShardPlan]:
    """Cut each split's sorted samples into consecutive shards of at most ``shard_size``."""
    plans = []
    for split, items in samples.items():
        items = sorted(items, key=lambda s: s.name)
        count = max(1, -(-len(items) // shard_size))
        for index in range(count):
            chunk = tuple(items[index * shard_size : (index + 1) * shard_size])
            plans.append(ShardPlan(split, index, count, chunk))
    return plans


def _record_path(out_dir: Path, plan: ShardPlan) -> Path:
    return out_dir / STATE_DIR / f"{plan.name}.json"


def shard_is_done(out_dir: Path, plan: ShardPlan, options: SampleOptions) -> bool:
    parquet, record = out_dir / DATA_DIR / plan.name, _record_path(out_dir, plan)
    if not (parquet.exists() and record.exists()):
        return False
    saved = json.loads(record.read_text())
    inputs = [s.name for s in plan.samples]
    return saved.get("inputs") == inputs and saved.get("options") == options.record()


def load_row(sample: RawSample, options: SampleOptions) -> dict:
    """Read and preprocess one raw sample into a dataset row; SkipSample says why not."""
    image, label = read_raw_sample(sample)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        raise SkipSample(f"image has {image.shape[2]} channels (shape {image.shape}); expected grayscale")
    size = (options.height, options.width)
    if options.letterbox and image.ndim == 2 and image.shape != size and label.shape == image.shape:
        image, _ = letterbox(image, *size)
        label, _ = letterbox(label, *size, is_mask=True)
    row = process_sample(image, label, size, options.pupil_class, options.keep_empty)
    row["filename"] = sample.name
    return row


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one OpenCV thread per worker process: the pool owns the cores


def _process(job: tuple[RawSample, SampleOptions]):
    sample, options = job
    try:
        return sample, load_row(sample, options), None
    except SkipSample as exc:
        return sample, None, str(exc)


def _write_shard(out_dir: Path, plan: ShardPlan, rows: list[dict], skipped: list[dict], options) -> None:
    features = dataset_features(options.height, options.width)
    columns = {name: [row[name] for row in rows] for name in features}
    record = {"inputs": [s.name for s in plan.samples], "options": options.record(),
              "rows": len(rows), "skipped": skipped}
    atomic_write_json(_record_path(out_dir, plan), record)
    with atomic_path(out_dir / DATA_DIR / plan.name) as tmp:
        Dataset.from_dict(columns, features=features).to_parquet(str(tmp))


def _remove_stale_shards(out_dir: Path, plans: list[ShardPlan]) -> None:
    """Drop shards of the planned splits that the current plan no longer names."""
    wanted = {p.name for p in plans}
    for split in {p.split for p in plans}:
        for path in (out_dir / DATA_DIR).glob(f"{split}-*.parquet"):
            if path.name not in wanted:
                path.unlink()
                (out_dir / STATE_DIR / f"{path.name}.json").unlink(missing_ok=True)


def run_shards(out_dir, plans: list[ShardPlan], options: SampleOptions, workers: int) -> dict:
    """Process every shard that is not done; returns {"done": n, "processed": n, "samples": n}."""
    out_dir = Path(out_dir)
    for sub in (DATA_DIR, STATE_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir / sub)
    _remove_stale_shards(out_dir, plans)
    todo = [p for p in plans if not shard_is_done(out_dir, p, options)]
    total = sum(len(p.samples) for p in todo)
    datasets.disable_progress_bars()  # one bar for the whole run, not one per shard
    with mp.get_context("spawn").Pool(workers, initializer=_worker_init) as pool, tqdm(
        total=total, desc="preprocess", unit="sample", dynamic_ncols=True
    ) as bar:
        for plan in todo:
            rows, skipped = [], []
            jobs = [(s, options) for s in plan.samples]
            for sample, row, reason in pool.imap(_process, jobs, chunksize=4):
                if row is None:
                    skipped.append({"split": sample.split, "file": sample.name, "reason": reason})
                else:
                    rows.append(row)
                bar.update(1)
            _write_shard(out_dir, plan, rows, skipped, options)
    return {"done": len(plans) - len(todo), "processed": len(todo), "samples": total}


def collect_records(out_dir, plans: list[ShardPlan]) -> dict:
    """Per-split row counts and every skipped sample, from the shard records of ``plans``."""
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    for plan in plans:
        record = json.loads(_record_path(Path(out_dir), plan).read_text())
        entry = splits.setdefault(plan.split, {"rows": 0, "skipped": 0, "shards": plan.count})
        entry["rows"] += record["rows"]
        entry["skipped"] += len(record["skipped"])
        skipped.extend(record["skipped"])
    return {"splits": splits, "skipped": skipped}


def summarize_skips(skipped: list[dict], limit: int = 3) -> str:
    """'reason (n), reason (n)' for the most common skip reasons."""
    counts = Counter(entry["reason"] for entry in skipped)
    return ", ".join(f"{reason} ({n}x)" for reason, n in counts.most_common(limit))


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1




def package_versions() -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
    }


def write_manifest(out_dir, plans: list[ShardPlan], options: SampleOptions, source: str) -> dict:
    """Merge this run's shard records with splits already in the manifest; rewrite the card."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text()) if path.exists() else {"splits": {}, "skipped": []}
    current = collect_records(out_dir, plans)
    redone = set(current["splits"])
    kept = {k: v for k, v in manifest["splits"].items() if k not in redone}
    manifest["splits"] = {**kept, **current["splits"]}
    manifest["skipped"] = [s for s in manifest["skipped"] if s["split"] not in redone] + current["skipped"]
    features = dataset_features(options.height, options.width)
    manifest.update(
        source=source,
        updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        image_size=[options.height, options.width],
        options=options.record(),
        versions=package_versions(),
        schema={name: str(feature) for name, feature in features.items()},
    )
    atomic_write_json(path, manifest)
    card = dataset_card(sorted(manifest["splits"]), options.height, options.width, source)
    atomic_write_text(out_dir / "README.md", card)
    return manifest


def check_not_all_skipped(manifest: dict, options: SampleOptions) -> None:
    """UserError naming what was found when a split kept no sample at all."""
    for split, counts in manifest["splits"].items():
        if counts["rows"] == 0 and counts["skipped"] > 0:
            reasons = summarize_skips([s for s in manifest["skipped"] if s["split"] == split])
            raise UserError(
                f"all {counts['skipped']} samples of split '{split}' were skipped: {reasons}. "
                f"Frames must be {options.height}x{options.width} uint8 grayscale with labels in 0..3: "
                "use --size H W to change the expected size, --letterbox to fit other sizes into it, "
                "or --keep-empty to keep frames without a pupil."
            )


def build_dataset(samples: dict[str, list[RawSample]], out_dir, options: SampleOptions, workers: int,
                  shard_size: int, source: str) -> tuple[dict, dict]:
    """Plan, process (resuming), write the manifest and check the result: (manifest, stats)."""
    plans = plan_shards(samples, shard_size)
    start = time.perf_counter()
    stats = run_shards(out_dir, plans, options, workers)
    stats["seconds"] = time.perf_counter() - start
    manifest = write_manifest(out_dir, plans, options, source)
    check_not_all_skipped(manifest, options)
    return manifest, stats
