"""Transfer benchmark: TinyEfficientViTSeg trained one way, scored on the pupils of new cameras and people.

Settings (one line each in the table):
    cross-camera    trained on synthetic frames, scored on the domain-randomized generator's held-out
                    family (rendering parameters that no training frame has)
    real-split      trained on the real data's train split, scored on its val split (the export's own
                    split: in the public set both hold frames of the same people, see the README)
    zero-shot       trained on synthetic frames only, scored on the real val split
The real data is a YOLO segmentation export (images/{train,val}, labels/{train,val}) given with
--real-dir and imported with precompute.py --source folder; without it only cross-camera runs.

Rows (``ROWS``): the baseline (the original augmentation, the default generator), one change at a
time (each augmentation group, the randomized generator's training family instead of the default
one, which for real-split is mixed into the real frames), all of them together, then recipe
levers on top of that (twice the epochs, an EMA of the weights, the loss balance).

Every run is the real training script (train_efficientvit_local.py) in a subprocess with
--jobs of them at once, each with --threads CPU threads. A run's figures are those of its last
epoch, never of a checkpoint chosen on a test set: the training run validates on its first test
set, and evaluate.py scores its last checkpoint on any other (the same metrics code). Each figure
in the table is the mean ± the sample standard deviation over --seeds training seeds (the data are
rendered once). Datasets are built once under --work-dir (``data/``, their Arrow cache in
``cache/``); each run writes ``runs/<row>/<trained on>/seed<n>/result.json``, which a rerun reuses,
and an unfinished run resumes from its last checkpoint (a work folder keeps one scale: frame size,
data sizes and schedule, recorded in ``scale.json``). The table goes to stdout and
``table.md``, every run and cell to ``results.json``.

Examples:
    # the full table on a GPU (benchmarks/run_transfer_gpu.sh wraps this)
    python benchmarks/bench_transfer.py --real-dir /data/eye-pupil/data --work-dir transfer \\
        --jobs 8 --device cuda --data-on-device on
    # a few rows, one seed, two epochs, on the CPU
    python benchmarks/bench_transfer.py --real-dir DIR --work-dir transfer-cpu --rows baseline geometric \\
        --seeds 0 --epochs 2 --jobs 1
    # tiny frames and one epoch: checks the whole path in a minute
    python benchmarks/bench_transfer.py --smoke --real-dir DIR --work-dir /tmp/transfer-smoke --rows ema
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import precompute  # noqa: E402
from common.cli import parse_frame_size, positive_int, report_errors  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.files import atomic_write_json, atomic_write_text  # noqa: E402
from common.schema import DATA_DIR  # noqa: E402
from common.specs import EFFICIENTVIT as SPEC  # noqa: E402
from common.train.data import TRAIN_SPLIT, VALID_SPLIT, load_splits  # noqa: E402

TRAIN_SCRIPT, EVALUATE_SCRIPT = ROOT / "train_efficientvit_local.py", ROOT / "evaluate.py"
# per cell: pupil IoU over the split's pixels, the per-frame IoU median and 10th percentile, the
# centre error (frames with a true and a predicted pupil) and the detection rate at 5 px
METRICS = ("pupil_iou", "pupil_iou_median", "pupil_iou_p10", "center_error_px", "detection_rate_5px")
SETTINGS = {"cross-camera": "synthetic -> held-out synthetic family",
            "real-split": "real train -> real val, the export's own split",
            "zero-shot": "synthetic -> real val"}


@dataclass(frozen=True)
class Row:
    """One training recipe: the flags it passes and the synthetic data it trains on."""

    name: str
    change: str  # what differs, for the table's legend
    augment: str = "original"
    synthetic: str = "default"  # the generator of the synthetic training frames: default | randomized
    epochs_factor: int = 1
    ema: float = 0.0
    alpha_floor: float = 0.2


TOGETHER = {"augment": "all", "synthetic": "randomized"}
ROWS = (
    Row("baseline", "original augmentation (flip, lines, blur); default synthetic generator"),
    Row("photometric", "+ photometric augmentation", augment="original,photometric"),
    Row("geometric", "+ geometric augmentation", augment="original,geometric"),
    Row("occluders", "+ occluder augmentation", augment="original,occluders"),
    Row("randomized", "randomized generator's train family instead of the default generator "
                      "(real-split: real frames + randomized frames)", synthetic="randomized"),
    Row("together", "all augmentation groups + randomized data", **TOGETHER),
    Row("longer", "together, twice the epochs", epochs_factor=2, **TOGETHER),
    Row("ema", "together, EMA of the weights (--ema 0.99)", ema=0.99, **TOGETHER),
    Row("dice", "together, Dice alone (--alpha-floor 1: no surface term)", alpha_floor=1.0, **TOGETHER),
)
ROW_NAMES = tuple(row.name for row in ROWS)


@dataclass(frozen=True)
class Scale:
    """Frame size, data sizes and the training schedule of a benchmark."""

    size: tuple[int, int]  # (H, W): portrait 320x240 holds the real frames whole
    synthetic_frames: int  # rendered for each synthetic training set (frames without a pupil are skipped)
    heldout_frames: int  # the held-out family's test set
    mix_frames: int  # randomized frames added to the real train split (whole shards, at least this many)
    shard_size: int
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]


FULL = Scale((320, 240), synthetic_frames=640, heldout_frames=300, mix_frames=300, shard_size=50, epochs=15,
             batch_size=16, seeds=(0, 1, 2))
SMOKE = Scale((96, 80), synthetic_frames=24, heldout_frames=12, mix_frames=8, shard_size=8, epochs=1,
              batch_size=4, seeds=(0,))


@dataclass(frozen=True)
class Run:
    row: Row
    trained_on: str  # "synthetic" (the row's synthetic data) or "real" (the real train split)
    seed: int

    @property
    def key(self) -> str:
        return f"{self.row.name}/{self.trained_on}/seed{self.seed}"

    def epochs(self, scale: Scale) -> int:
        return scale.epochs * self.row.epochs_factor


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-dir", type=Path,
                        help="the real YOLO export (images/{train,val}, labels/{train,val})")
    parser.add_argument("--work-dir", type=Path, required=True,
                        help="datasets, runs, results.json and table.md (a rerun reuses what is there)")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=list(ROW_NAMES), metavar="ROW",
                        help=f"rows to run (default all): {' '.join(ROW_NAMES)}")
    parser.add_argument("--trained-on", nargs="+", choices=("synthetic", "real"),
                        default=["synthetic", "real"],
                        help="which runs of each row: trained on synthetic data (cross-camera, zero-shot) "
                             "and/or on the real train split (real-split); default both")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0 1 2; --smoke: 0)")
    parser.add_argument("--epochs", type=positive_int, help="epochs of a run (default 15; --smoke: 1)")
    parser.add_argument("--batch-size", type=positive_int, help="default 16 (--smoke: 4)")
    parser.add_argument("--size", nargs=2, type=positive_int, metavar=("H", "W"),
                        help="frame size, multiples of 16 (default 320 240; --smoke: 96 80)")
    parser.add_argument("--smoke", action="store_true", help="tiny frames and data, one epoch, one seed")
    parser.add_argument("--jobs", default=1, type=positive_int, help="training runs at once")
    parser.add_argument("--threads", type=positive_int, help="CPU threads per run (default: cores / jobs)")
    parser.add_argument("--workers", default=1, type=positive_int,
                        help="precompute processes for the datasets")
    parser.add_argument("--device", default="auto", help="passed to the training script and evaluate.py")
    parser.add_argument("--data-on-device", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile in each run (default off: compiling costs more than these runs)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: the training script's, on for CUDA)")
    return parser


def resolve_scale(args) -> Scale:
    scale = SMOKE if args.smoke else FULL
    size = parse_frame_size([str(v) for v in args.size]) if args.size else scale.size
    if any(v % 16 for v in size):
        raise UserError(f"--size {size[0]} {size[1]}: both must be multiples of 16")
    return replace(scale, size=tuple(size), epochs=args.epochs or scale.epochs,
                   batch_size=args.batch_size or scale.batch_size,
                   seeds=tuple(args.seeds) if args.seeds is not None else scale.seeds)


# ----------------------------------------------------------------------------- data
def build_datasets(work: Path, scale: Scale, real_dir: Path | None, rows, workers: int) -> dict[str, Path]:
    """The datasets the rows need, each built once by precompute.py under work/data (a rerun reuses
    or completes them): synthetic-default (the default generator), synthetic-randomized (the
    randomized generator's train family), heldout (its held-out family, validation split only) and
    real (the YOLO export)."""
    height, width = scale.size
    common = ["--size", str(height), str(width), "--no-push", "--workers", str(workers),
              "--shard-size", str(scale.shard_size)]
    recipes = {"heldout": ["--synthetic", str(scale.heldout_frames), "--randomized", "heldout",
                           "--splits", VALID_SPLIT]}
    for generator in sorted({row.synthetic for row in rows}):
        family = [] if generator == "default" else ["--randomized", "train"]
        recipes[synthetic_data(generator)] = ["--synthetic", str(scale.synthetic_frames), *family,
                                              "--splits", TRAIN_SPLIT]
    if real_dir is not None:
        recipes["real"] = ["--source", "folder", "--raw-dir", str(real_dir)]
    built = {}
    for name, flags in recipes.items():
        out = work / "data" / name
        raw = [] if name == "real" else ["--raw-dir", str(work / "raw" / name)]
        print(f"dataset {name}: {out}", flush=True)
        precompute.main(precompute.get_args_parser().parse_args(
            [*flags, *raw, "--output-dir", str(out), *common]))
        built[name] = out
    return built


def synthetic_data(generator: str) -> str:
    """The name of the dataset a row's ``synthetic`` generator renders."""
    return f"synthetic-{generator}"


def take_shards(dataset: Path, split: str, rows: int | None = None) -> list[Path]:
    """The split's shards of ``dataset``, in order; with ``rows``, only as many whole shards as
    reach that many rows."""
    shards = sorted((dataset / DATA_DIR).glob(f"{split}-*.parquet"))
    if rows is None:
        return shards
    taken, count = [], 0
    for shard in shards:
        if count >= rows:
            break
        taken.append(shard)
        count += pq.read_metadata(shard).num_rows
    return taken


def link_dataset(folder: Path, parts: dict[str, list[list[Path]]]) -> Path:
    """A dataset folder whose data/ holds links to other datasets' shards: ``parts[split]`` is a
    list of shard lists, the split's rows in that order. Left alone when it already links them."""
    links = {f"{split}-{k}{i:04d}.parquet": shard.resolve()
             for split, groups in parts.items() for k, shards in enumerate(groups)
             for i, shard in enumerate(shards)}
    data = folder / DATA_DIR
    if data.is_dir() and {path.name: path.resolve() for path in data.glob("*.parquet")} == links:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    data.mkdir(parents=True)
    for name, target in links.items():
        (data / name).symlink_to(target)
    return folder


def run_folders(run: Run, data: dict[str, Path], work: Path,
                scale: Scale) -> tuple[Path, list[tuple[str, Path]]]:
    """(dataset the run trains on, [(setting, dataset whose validation split scores it)]): the first
    test set is the training folder's own validation split, the others are scored by evaluate.py."""
    mixes, real, heldout = work / "mixes", data.get("real"), take_shards(data["heldout"], VALID_SPLIT)
    synthetic = synthetic_data(run.row.synthetic)
    if run.trained_on == "real":
        if run.row.synthetic == "default":
            return real, [("real-split", real)]
        extra = take_shards(data[synthetic], TRAIN_SPLIT, scale.mix_frames)
        folder = link_dataset(mixes / f"real+{synthetic}", {
            TRAIN_SPLIT: [take_shards(real, TRAIN_SPLIT), extra],
            VALID_SPLIT: [take_shards(real, VALID_SPLIT)]})
        return folder, [("real-split", folder)]
    train = [take_shards(data[synthetic], TRAIN_SPLIT)]
    if real is None:
        folder = link_dataset(mixes / f"{synthetic}--heldout", {TRAIN_SPLIT: train, VALID_SPLIT: [heldout]})
        return folder, [("cross-camera", folder)]
    folder = link_dataset(mixes / f"{synthetic}--real",
                          {TRAIN_SPLIT: train, VALID_SPLIT: [take_shards(real, VALID_SPLIT)]})
    # evaluate.py reads both
    test = link_dataset(mixes / "heldout", {TRAIN_SPLIT: [heldout], VALID_SPLIT: [heldout]})
    return folder, [("zero-shot", folder), ("cross-camera", test)]


def plan_runs(rows, seeds, with_real: bool, trained_on=("synthetic", "real")) -> list[Run]:
    """Every (row, trained on, seed), the longest first (so the last runs to start are short ones)."""
    sources = [source for source in ("synthetic", "real")
               if source in trained_on and (with_real or source != "real")]
    runs = [Run(row, source, seed) for row in rows for source in sources for seed in seeds]
    return sorted(runs, key=lambda run: -run.row.epochs_factor * (1.5 if run.trained_on == "real"
                                                                   and run.row.synthetic != "default"
                                                                   else 1.0))


# ----------------------------------------------------------------------------- runs
class RunFailed(UserError):
    """A training or evaluation subprocess that exited non-zero."""


def job_env(threads: int) -> dict:
    """The environment of a run: ``threads`` CPU threads for torch and OpenMP, no MLflow logging."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({name: str(threads)
                for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def call(command: list, log: Path, env: dict) -> None:
    """Run ``command`` from the repository root with its output in ``log``; RunFailed on failure."""
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(str(c) for c in command)}\n")
        handle.flush()
        code = subprocess.run([str(c) for c in command], stdout=handle, stderr=subprocess.STDOUT, env=env,
                              check=False, cwd=ROOT).returncode
    if code:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
        raise RunFailed(f"exit code {code} from {Path(str(command[1])).name}; log {log}:\n{tail}")


def train_command(run: Run, folder: Path, out: Path, scale: Scale, args) -> list:
    row = run.row
    command = [sys.executable, TRAIN_SCRIPT, "--dataset", folder, "--data-dir", args.work_dir / "cache",
               "--output-dir", out, "--epochs", run.epochs(scale), "--batch-size", scale.batch_size,
               "--seed", run.seed, "--device", args.device, "--augment", row.augment, "--ema", row.ema,
               "--alpha-floor", row.alpha_floor, "--no-export", "--num-workers", 0,
               "--data-on-device", args.data_on_device, "--compile" if args.compile else "--no-compile"]
    if args.amp is not None:
        command.append("--amp" if args.amp else "--no-amp")
    last = out / SPEC.last_name
    return command + (["--resume", last] if last.is_file() else [])  # a killed run continues


def evaluate_command(out: Path, folder: Path, report: Path, args) -> list:
    return [sys.executable, EVALUATE_SCRIPT, "--model", out / SPEC.last_name, "--dataset", folder,
            "--data-dir", args.work_dir / "cache", "--output-dir", report, "--device", args.device,
            "--batch-size", 32, "--num-workers", 0]


def execute(run: Run, folders, scale: Scale, args, env: dict) -> dict:
    """Train (or finish) one run and score it on its test sets; the result is written to
    runs/<key>/result.json, and an existing one is returned as it is."""
    out = args.work_dir / "runs" / run.key
    done = out / "result.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    folder, tests = folders
    start = time.perf_counter()
    call(train_command(run, folder, out, scale, args), out / "train.log", env)
    last = json.loads((out / f"{SPEC.metrics_name}.json").read_text())[-1]  # the last epoch, not the best
    scores = {tests[0][0]: {name: last.get(f"valid_{name}") for name in METRICS}}
    for setting, test in tests[1:]:
        report = out / f"evaluate-{setting}"
        call(evaluate_command(out, test, report, args), out / "evaluate.log", env)
        summary = json.loads((report / "summary.json").read_text())
        scores[setting] = {name: summary.get(name) for name in METRICS}
    result = {"row": run.row.name, "trained_on": run.trained_on, "seed": run.seed,
              "epochs": run.epochs(scale), "train_dataset": str(folder),
              "seconds": round(time.perf_counter() - start, 1), "scores": scores}
    atomic_write_json(done, result)
    return result


def run_all(runs: list[Run], folders: dict, scale: Scale, args) -> tuple[list[dict], list[str]]:
    """Every run, --jobs at a time; prints one line per finished run with an estimate of the rest."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env, results, failures = job_env(threads), [], []
    start, trained = time.perf_counter(), 0
    print(f"{len(runs)} runs, {args.jobs} at a time, {threads} CPU threads each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(execute, run, folders[run.key], scale, args, env): run for run in runs}
        for done, future in enumerate(as_completed(futures), 1):
            run = futures[future]
            try:
                result = future.result()
            except RunFailed as exc:
                failures.append(f"{run.key}: {exc}")
                print(f"[{done}/{len(runs)}] {run.key} FAILED: {exc}", flush=True)
                continue
            results.append(result)
            trained += not result.get("reused")
            print(f"[{done}/{len(runs)}] {progress_line(run, result, start, trained, len(runs) - done)}",
                  flush=True)
    return results, failures


def progress_line(run: Run, result: dict, start: float, trained: int, left: int) -> str:
    scores = " | ".join(f"{setting} IoU {values['pupil_iou']:.3f}"
                        for setting, values in result["scores"].items())
    if result.get("reused"):
        return f"{run.key}: reused | {scores}"
    elapsed = time.perf_counter() - start
    return (f"{run.key}: {result['seconds']:.0f} s | {scores} | "
            f"about {elapsed / trained * left / 60:.1f} min left")


# ----------------------------------------------------------------------------- the table
def spread(values: list) -> dict | None:
    """Mean, sample standard deviation (0 for one value) and count of the finite ``values``."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return {"mean": statistics.fmean(finite), "std": std, "n": len(finite)}


def summarize(results: list[dict], rows) -> list[dict]:
    """One cell per (row, setting) with results: every metric's spread over the seeds."""
    cells = []
    for row in rows:
        for setting in SETTINGS:
            scores = [r["scores"][setting] for r in results
                      if r["row"] == row.name and setting in r["scores"]]
            if scores:
                cells.append({"row": row.name, "setting": setting, "seeds": len(scores),
                              **{name: spread([s.get(name) for s in scores]) for name in METRICS}})
    return cells


def formatted(value: dict | None, digits: int, seeds: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
    return text if value["n"] == seeds else f"{text} ({value['n']} of {seeds})"


def markdown_table(cells: list[dict], rows) -> str:
    """The README's table: mean ± standard deviation over the seeds, and a legend of the rows."""
    lines = ["| row | setting | pupil IoU | per-frame IoU median / p10 | centre error px | "
             "detection @ 5 px | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for cell in cells:
        median, p10 = cell["pupil_iou_median"], cell["pupil_iou_p10"]
        frames = "n/a" if median is None or p10 is None else f"{median['mean']:.3f} / {p10['mean']:.3f}"
        lines.append(f"| {cell['row']} | {cell['setting']} | "
                     f"{formatted(cell['pupil_iou'], 3, cell['seeds'])} | "
                     f"{frames} | {formatted(cell['center_error_px'], 2, cell['seeds'])} | "
                     f"{formatted(cell['detection_rate_5px'], 3, cell['seeds'])} | {cell['seeds']} |")
    used = {cell["row"] for cell in cells}
    lines += ["", *[f"- **{row.name}**: {row.change}" for row in rows if row.name in used]]
    lines += [f"- *{setting}*: {about}" for setting, about in SETTINGS.items()
              if any(cell["setting"] == setting for cell in cells)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def check_real_dir(path: Path | None) -> Path | None:
    if path is None:
        print("no --real-dir: the real-data settings (real-split, zero-shot) are left out")
        return None
    if not (path / "images").is_dir() or not (path / "labels").is_dir():
        raise UserError(f"--real-dir {path} must hold images/ and labels/ (a YOLO segmentation export)")
    return path.resolve()


def check_work_dir(work: Path, scale: Scale) -> None:
    """A work folder holds one scale: its datasets and finished runs are reused as they are, so a
    rerun with another frame size, data size or schedule would mix them. scale.json records it."""
    recorded, wanted = work / "scale.json", {k: v for k, v in asdict(scale).items() if k != "seeds"}
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        changed = sorted(k for k in wanted if json.dumps(before.get(k)) != json.dumps(wanted[k]))
        if changed:
            raise UserError(f"{work} holds runs with other {', '.join(changed)} ("
                            + ", ".join(f"{k} {before.get(k)} there, {wanted[k]} now" for k in changed)
                            + "); give another --work-dir")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded, wanted)


def prepare(runs: list[Run], data: dict[str, Path], scale: Scale, cache: Path) -> dict:
    """Every run's (training folder, test sets), with each folder's Arrow cache built once here,
    before parallel runs would all build it."""
    folders = {run.key: run_folders(run, data, cache.parent, scale) for run in runs}
    unique = {path for folder, tests in folders.values() for path in (folder, *(test for _, test in tests))}
    for path in sorted(unique):
        load_splits(path, cache)
    return folders


@report_errors
def main(args) -> dict:
    scale = resolve_scale(args)
    args.work_dir = args.work_dir.expanduser().resolve()
    rows = [row for row in ROWS if row.name in args.rows]
    real = check_real_dir(args.real_dir)
    check_work_dir(args.work_dir, scale)
    data = build_datasets(args.work_dir, scale, real, rows, args.workers)
    runs = plan_runs(rows, scale.seeds, real is not None, args.trained_on)
    folders = prepare(runs, data, scale, args.work_dir / "cache")
    started = time.perf_counter()
    results, failures = run_all(runs, folders, scale, args)
    cells = summarize(results, rows)
    table = markdown_table(cells, rows)
    summary = {"scale": asdict(scale), "rows": [asdict(row) for row in rows], "device": args.device,
               "jobs": args.jobs, "wall_seconds": round(time.perf_counter() - started, 1),
               "runs": sorted(results, key=lambda r: (r["row"], r["trained_on"], r["seed"])), "cells": cells}
    atomic_write_json(args.work_dir / "results.json", summary)
    atomic_write_text(args.work_dir / "table.md", table)
    print(f"\n{table}\nwrote {args.work_dir / 'results.json'} and {args.work_dir / 'table.md'} "
          f"({summary['wall_seconds']:.0f} s of runs)")
    if failures:
        raise UserError(f"{len(failures)} of {len(runs)} runs failed (a rerun retries them):\n"
                        + "\n".join(failures))
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
