"""The precompute engine: raw samples -> preprocessed parquet shards, in parallel and resumable.

Each split's samples are sorted by name and cut into fixed-size shards. A shard is done when its
parquet file exists under ``data/`` and its record under ``.shards/`` lists exactly the inputs and
preprocessing parameters of the current run. Both files are written atomically (record first, then
the parquet), so a run killed at any point leaves no file a loader would accept as a shard, and a
rerun redoes only the shards that are not done.

Shards are the unit of parallel work: a worker process reads, preprocesses and writes a whole
shard, so rows never travel between processes. A run uses at most one worker per shard.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import queue
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import datasets
import numpy as np
import pyarrow

from common.errors import UserError
from common.files import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temporaries
from common.prep.folder_source import FolderImportError, FolderSample, MaskFormat, load_folder_sample
from common.prep.openeds_source import RawSample, read_raw_sample
from common.prep.preprocess import SkipSample, letterbox, preprocessing_params, process_sample
from common.prep.shards import ShardBuffer, write_parquet
from common.progress import progress_bar
from common.schema import DATA_DIR, MANIFEST_NAME, STATE_DIR, dataset_card, dataset_features, shard_name


@dataclass(frozen=True)
class SampleOptions:
    """How raw samples become rows; part of every shard's record."""

    height: int = 400
    width: int = 640
    letterbox: bool = False  # fit other sizes into (height, width) instead of skipping them
    pupil_class: int = 3
    keep_empty: bool = False
    mask_format: MaskFormat | None = None  # folder datasets: how their mask files are read
    native_size: bool = False  # folder datasets: frames keep their size, which must be height x width

    def record(self) -> dict:
        """JSON-ready (tuples become lists), so it compares equal to a record read back from disk."""
        record = {**dataclasses.asdict(self), "preprocessing": preprocessing_params()}
        return json.loads(json.dumps(record))

    @classmethod
    def from_record(cls, record: dict) -> "SampleOptions":
        """Inverse of ``record`` (the manifest's "options")."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        if values.get("mask_format"):
            fmt = values["mask_format"]
            values["mask_format"] = MaskFormat(
                fmt["kind"], fmt["pupil_class"],
                tuple(fmt["pupil_colour"]) if fmt["pupil_colour"] else None,
                tuple(tuple(c) for c in fmt["colours"]),
            )
        return cls(**values)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    count: int
    samples: tuple[RawSample | FolderSample, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index, self.count)


def plan_shards(samples: dict[str, list[RawSample | FolderSample]], shard_size: int) -> list[ShardPlan]:
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
    inputs = [input_key(s) for s in plan.samples]
    return saved.get("inputs") == inputs and saved.get("options") == options.record()


def _file_stamp(path: str | None) -> list[int] | None:
    if path is None:
        return None
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


def input_key(sample: RawSample | FolderSample):
    """What identifies a sample's inputs in a shard record.

    OpenEDS files never change, so the name suffices. A user's folder dataset is relabelled in
    place (a new CVAT export overwrites the masks), so its key includes each file's size and
    modification time: a shard whose files changed is redone.
    """
    if isinstance(sample, FolderSample):
        return [sample.name, _file_stamp(sample.image_path), _file_stamp(sample.mask_path)]
    return sample.name


def _read_openeds(sample: RawSample, options: SampleOptions):
    image, label = read_raw_sample(sample)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        raise SkipSample(f"image has {image.shape[2]} channels (shape {image.shape}); expected grayscale")
    size = (options.height, options.width)
    box = None
    if options.letterbox and image.ndim == 2 and image.shape != size and label.shape == image.shape:
        image, geometry = letterbox(image, *size)
        label, _ = letterbox(label, *size, is_mask=True)
        box = dataclasses.asdict(geometry)
    return image, label, options.pupil_class, box


def _read_folder(sample: FolderSample, options: SampleOptions):
    size = "native" if options.native_size else (options.height, options.width)
    image, pupil, box = load_folder_sample(sample, options.mask_format, size=size)
    if options.native_size and image.shape != (options.height, options.width):
        raise FolderImportError(
            f"{sample.name} is {image.shape[0]}x{image.shape[1]}, but --size native needs every image at "
            f"{options.height}x{options.width} (the size of the first one); give --size H W to letterbox them"
        )
    return image, pupil, 1, box  # load_folder_sample returns a 0/1 pupil mask


def load_row(sample: RawSample | FolderSample, options: SampleOptions) -> tuple[dict, dict | None]:
    """Read and preprocess one sample: (dataset row, letterbox geometry or None when not letterboxed).

    SkipSample says why a sample has no row; FolderImportError stops the run (the dataset needs fixing).
    """
    reader = _read_folder if isinstance(sample, FolderSample) else _read_openeds
    image, label, pupil_class, box = reader(sample, options)
    row = process_sample(image, label, (options.height, options.width), pupil_class, options.keep_empty)
    row["filename"] = sample.name
    return row, box


def _worker_init(progress, parent: int) -> None:
    global _PROGRESS, _PARENT
    _PROGRESS, _PARENT = progress, parent
    cv2.setNumThreads(1)  # one OpenCV thread per worker process: the pool owns the cores
    if sys.platform.startswith("linux"):
        # Workers write shards, so they must end with the main process: a run killed with kill -9
        # writes nothing afterwards, and no orphan races a rerun for the same shard.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the main process died before the line above took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_PROGRESS = None  # per worker: the queue that feeds the main process's progress bar
_PARENT = None  # per worker: the main process's pid


def _run_shard(job: tuple[Path, ShardPlan, SampleOptions]) -> str:
    """In a worker: read and preprocess every sample of one shard, then write the shard and its record.

    The rows stay in this process, in numpy buffers that become the parquet file's Arrow columns;
    only a count per sample goes to the main process, for its progress bar.
    """
    out_dir, plan, options = job
    buffer = ShardBuffer(dataset_features(options.height, options.width), len(plan.samples))
    skipped, boxes = [], {}
    for sample in plan.samples:
        try:
            row, box = load_row(sample, options)
        except SkipSample as exc:
            skipped.append({"split": sample.split, "file": sample.name, "reason": str(exc)})
        else:
            buffer.add(row)
            if box is not None:
                boxes[sample.name] = box
        _PROGRESS.put(1)
    if os.getppid() != _PARENT:  # where no parent-death signal exists: the run was killed, write nothing
        os._exit(1)
    _write_shard(out_dir, plan, buffer, skipped, boxes, options)
    return plan.name


def _write_shard(out_dir: Path, plan: ShardPlan, buffer: ShardBuffer, skipped: list[dict], boxes: dict,
                 options) -> None:
    record = {"inputs": [input_key(s) for s in plan.samples], "options": options.record(),
              "rows": buffer.rows, "skipped": skipped, "letterbox": boxes}
    atomic_write_json(_record_path(out_dir, plan), record)
    with atomic_path(out_dir / DATA_DIR / plan.name) as tmp:
        write_parquet(buffer.table(), tmp)


def _remove_stale_shards(out_dir: Path, plans: list[ShardPlan]) -> None:
    """Drop shards of the planned splits that the current plan no longer names."""
    wanted = {p.name for p in plans}
    for split in {p.split for p in plans}:
        for path in (out_dir / DATA_DIR).glob(f"{split}-*.parquet"):
            if path.name not in wanted:
                path.unlink()
                (out_dir / STATE_DIR / f"{path.name}.json").unlink(missing_ok=True)


def run_shards(out_dir, plans: list[ShardPlan], options: SampleOptions, workers: int) -> dict:
    """Process every shard that is not done; returns {"done", "processed", "samples", "workers"}.

    Each worker takes whole shards and writes them itself; the main process only hands out shards
    (largest first, so the short last shards of each split fill the end) and shows one progress bar.
    """
    out_dir = Path(out_dir)
    for sub in (DATA_DIR, STATE_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir / sub)
    _remove_stale_shards(out_dir, plans)
    todo = sorted((p for p in plans if not shard_is_done(out_dir, p, options)), key=lambda p: -len(p.samples))
    total = sum(len(p.samples) for p in todo)
    workers = max(1, min(workers, len(todo)))  # a worker without a shard would only cost its start-up
    if todo:
        context = mp.get_context("spawn")
        progress = context.Queue()
        with context.Pool(workers, initializer=_worker_init, initargs=(progress, os.getpid())) as pool, \
                progress_bar(total, "preprocess", unit="sample") as bar:
            results = pool.imap_unordered(_run_shard, [(out_dir, p, options) for p in todo])
            _follow(results, progress, len(todo), bar)
    return {"done": len(plans) - len(todo), "processed": len(todo), "samples": total, "workers": workers}


def _follow(results, progress, shards: int, bar) -> None:
    """Update ``bar`` from the workers' per-sample counts until every shard is written.

    A worker's exception is raised here as soon as its shard fails (the pool is then terminated).
    """
    while shards or bar.n < bar.total:
        try:
            bar.update(progress.get(timeout=0.1))
            continue
        except queue.Empty:
            pass
        if shards:
            try:
                results.next(timeout=0)
                shards -= 1
            except mp.TimeoutError:
                pass


def collect_records(out_dir, plans: list[ShardPlan]) -> dict:
    """Per-split row counts, every skipped sample and letterbox geometries, from the records of ``plans``."""
    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    boxes: dict[str, dict] = {}
    for plan in plans:
        record = json.loads(_record_path(Path(out_dir), plan).read_text())
        entry = splits.setdefault(plan.split, {"rows": 0, "skipped": 0, "shards": plan.count})
        entry["rows"] += record["rows"]
        entry["skipped"] += len(record["skipped"])
        skipped.extend(record["skipped"])
        boxes.setdefault(plan.split, {}).update(record.get("letterbox", {}))
    return {"splits": splits, "skipped": skipped, "letterbox": boxes}


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
    # per split, {filename: Letterbox fields}: maps a row's pixels back to its original frame
    boxes = {k: v for k, v in manifest.get("letterbox", {}).items() if k not in redone}
    manifest["letterbox"] = {**boxes, **{k: v for k, v in current["letterbox"].items() if v}}
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
    if options.mask_format is not None:
        hint = "Use --keep-empty to keep images without a pupil as negatives."
    else:
        hint = (f"Frames must be {options.height}x{options.width} uint8 grayscale with labels in 0..3: "
                "use --size H W to change the expected size, --letterbox to fit other sizes into it, "
                "or --keep-empty to keep frames without a pupil.")
    for split, counts in manifest["splits"].items():
        if counts["rows"] == 0 and counts["skipped"] > 0:
            reasons = summarize_skips([s for s in manifest["skipped"] if s["split"] == split])
            raise UserError(f"all {counts['skipped']} samples of split '{split}' were skipped: "
                            f"{reasons}. {hint}")


def build_dataset(samples: dict[str, list[RawSample | FolderSample]], out_dir, options: SampleOptions,
                  workers: int, shard_size: int, source: str) -> tuple[dict, dict]:
    """Plan, process (resuming), write the manifest and check the result: (manifest, stats)."""
    plans = plan_shards(samples, shard_size)
    start = time.perf_counter()
    stats = run_shards(out_dir, plans, options, workers)
    stats["seconds"] = time.perf_counter() - start
    manifest = write_manifest(out_dir, plans, options, source)
    check_not_all_skipped(manifest, options)
    return manifest, stats
