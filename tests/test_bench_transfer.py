"""benchmarks/bench_transfer.py: the plan of runs, linked datasets, the table's arithmetic, and the
whole benchmark in --smoke mode on small YOLO files written here (real subprocess training runs)."""

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.prep.synthetic import render_sample, sample_rng
from common.train.data import load_splits
from tests.helpers import ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "benchmarks" / "bench_transfer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def write_yolo_export(root: Path, counts=(("train", 12), ("val", 6)), height: int = 160,
                      width: int = 120) -> Path:
    """A YOLO segmentation export like the real one: portrait colour frames (a tinted rendered eye)
    and one normalized pupil polygon per label file, in images/{train,val} and labels/{train,val}."""
    index = 0
    for split, count in counts:
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for _ in range(count):
            while True:  # skip blinks: every frame here has a pupil
                image, label, _ = render_sample(sample_rng(5, index), height, width)
                index += 1
                contours, _ = cv2.findContours((label == 3).astype(np.uint8), cv2.RETR_EXTERNAL,
                                               cv2.CHAIN_APPROX_SIMPLE)
                if contours and len(max(contours, key=len)) >= 3:
                    break
            points = max(contours, key=len)[:, 0, :] / np.array([width, height])  # (N, 2) x, y in [0, 1]
            # BGR, pink like the real set
            tinted = np.dstack([image * 0.8, image * 0.6, image]).astype(np.uint8)
            cv2.imwrite(str(root / "images" / split / f"eye{index}.png"), tinted)
            (root / "labels" / split / f"eye{index}.txt").write_text(
                "0 " + " ".join(f"{v:.6f}" for v in points.ravel()) + "\n")
    return root


def test_every_row_changes_one_thing_against_the_baseline_or_together():
    rows = {row.name: row for row in bench.ROWS}
    fields = ("augment", "synthetic", "epochs_factor", "ema", "alpha_floor")

    def changed(row, base):
        return {name for name in fields if getattr(row, name) != getattr(base, name)}

    for name in ("photometric", "geometric", "occluders", "randomized"):
        assert len(changed(rows[name], rows["baseline"])) == 1, name
    assert changed(rows["together"], rows["baseline"]) == {"augment", "synthetic"}
    for name in ("longer", "ema", "dice"):
        assert len(changed(rows[name], rows["together"])) == 1, name


def test_plan_has_every_seed_of_every_row_and_the_longest_first():
    rows = [row for row in bench.ROWS if row.name in ("baseline", "longer", "randomized")]
    runs = bench.plan_runs(rows, (0, 1, 2), with_real=True)
    assert len(runs) == 3 * 2 * 3 and len({run.key for run in runs}) == len(runs)
    assert runs[0].row.name == "longer" and runs[0].trained_on == "real"  # 2 x epochs x 1.5 x frames
    assert [run.trained_on for run in bench.plan_runs(rows, (0,), with_real=False)] == ["synthetic"] * 3
    only_synthetic = bench.plan_runs(rows, (0, 1), with_real=True, trained_on=("synthetic",))
    assert sorted((run.row.name, run.seed) for run in only_synthetic) == [
        (name, seed) for name in ("baseline", "longer", "randomized") for seed in (0, 1)]
    assert {run.trained_on for run in only_synthetic} == {"synthetic"}


def _shard(path: Path, rows: int, start: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"value": list(range(start, start + rows))}), path)
    return path


def test_linked_dataset_takes_whole_shards_and_is_kept_when_unchanged(tmp_path):
    first = [_shard(tmp_path / "a" / "data" / f"train-0000{i}-of-00003.parquet", 4, 10 * i) for i in range(3)]
    other = _shard(tmp_path / "b" / "data" / "validation-00000-of-00001.parquet", 2, 100)
    assert bench.take_shards(tmp_path / "a", "train", 5) == first[:2]  # 4 rows < 5: a second shard
    assert bench.take_shards(tmp_path / "a", "train") == first
    folder = bench.link_dataset(tmp_path / "mix", {"train": [first[:1], [first[2]]], "validation": [[other]]})
    links = sorted((folder / "data").iterdir())
    assert [p.name for p in links] == ["train-00000.parquet", "train-10000.parquet",
                                       "validation-00000.parquet"]
    assert [p.resolve() for p in links] == [first[0], first[2], other]
    stamp = links[0].lstat().st_mtime_ns
    bench.link_dataset(tmp_path / "mix", {"train": [first[:1], [first[2]]], "validation": [[other]]})
    assert links[0].lstat().st_mtime_ns == stamp


def test_each_run_trains_on_its_rows_data_and_is_scored_on_the_right_splits(tmp_path):
    def dataset(name, splits):
        for split, rows in splits.items():
            _shard(tmp_path / name / "data" / f"{split}-00000-of-00001.parquet", rows, 0)
        return tmp_path / name

    data = {"heldout": dataset("heldout", {"validation": 3}),
            "real": dataset("real", {"train": 5, "validation": 2}),
            "synthetic-default": dataset("default", {"train": 4}),
            "synthetic-randomized": dataset("rand", {"train": 6})}
    scale = bench.SMOKE
    rows = {row.name: row for row in bench.ROWS}

    def linked(folder):
        return {p.name: p.resolve().parent.parent.name for p in sorted((folder / "data").iterdir())}

    folder, tests = bench.run_folders(bench.Run(rows["baseline"], "real", 0), data, tmp_path / "w", scale)
    assert folder == data["real"] and tests == [("real-split", data["real"])]
    folder, tests = bench.run_folders(bench.Run(rows["together"], "real", 0), data, tmp_path / "w", scale)
    assert linked(folder) == {"train-00000.parquet": "real", "train-10000.parquet": "rand",
                              "validation-00000.parquet": "real"}
    folder, tests = bench.run_folders(bench.Run(rows["geometric"], "synthetic", 0), data, tmp_path / "w",
                                      scale)
    assert linked(folder) == {"train-00000.parquet": "default", "validation-00000.parquet": "real"}
    assert [setting for setting, _ in tests] == ["zero-shot", "cross-camera"] and tests[0][1] == folder
    assert set(linked(tests[1][1]).values()) == {"heldout"}
    without_real = {k: v for k, v in data.items() if k != "real"}
    folder, tests = bench.run_folders(bench.Run(rows["ema"], "synthetic", 0), without_real,
                                      tmp_path / "w", scale)
    assert linked(folder) == {"train-00000.parquet": "rand", "validation-00000.parquet": "heldout"}
    assert tests == [("cross-camera", folder)]


def test_spread_is_the_mean_and_sample_deviation_of_finite_values():
    assert bench.spread([0.5, 0.7, 0.9]) == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2), "n": 3}
    assert bench.spread([1.0, math.nan, None]) == {"mean": 1.0, "std": 0.0, "n": 1}
    assert bench.spread([math.nan]) is None


def test_table_cells_and_lines_come_from_the_runs():
    rows = [bench.ROWS[0]]
    results = [{"row": "baseline", "seed": seed, "scores": {"zero-shot": {
        "pupil_iou": iou, "pupil_iou_median": iou, "pupil_iou_p10": iou / 2, "center_error_px": error,
        "detection_rate_5px": rate}}}
        for seed, iou, error, rate in ((0, 0.6, 2.0, 0.5), (1, 0.8, math.nan, 0.7))]
    cells = bench.summarize(results, rows)
    assert len(cells) == 1 and cells[0]["seeds"] == 2
    assert cells[0]["pupil_iou"]["mean"] == pytest.approx(0.7)
    assert cells[0]["pupil_iou"]["std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    line = bench.markdown_table(cells, rows).splitlines()[2]
    assert line == ("| baseline | zero-shot | 0.700 ± 0.141 | 0.700 / 0.350 | 2.00 ± 0.00 (1 of 2) | "
                    "0.600 ± 0.141 | 2 |")


def test_bad_real_dir_and_size_stop_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(bench.get_args_parser().parse_args(["--work-dir", str(tmp_path),
                                                       "--real-dir", str(tmp_path)]))
    assert stop.value.code != 0 and "must hold images/ and labels/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(bench.get_args_parser().parse_args(["--work-dir", str(tmp_path), "--size", "100", "80"]))
    assert "multiples of 16" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_writes_results_and_table_and_a_rerun_reuses_them(tmp_path, capsys):
    real = write_yolo_export(tmp_path / "real")
    argv = ["--smoke", "--real-dir", str(real), "--work-dir", str(tmp_path / "work"), "--rows", "ema",
            "--jobs", "2", "--threads", "1", "--device", "cpu"]
    summary = bench.main(bench.get_args_parser().parse_args(argv))
    work = tmp_path / "work"
    saved = json.loads((work / "results.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(summary["cells"]))
    assert {(r["trained_on"], tuple(sorted(r["scores"]))) for r in saved["runs"]} == {
        ("synthetic", ("cross-camera", "zero-shot")), ("real", ("real-split",))}
    assert [cell["setting"] for cell in saved["cells"]] == ["cross-camera", "real-split", "zero-shot"]
    by_setting = {cell["setting"]: cell for cell in saved["cells"]}
    for run in saved["runs"]:
        for setting, scores in run["scores"].items():
            assert by_setting[setting]["pupil_iou"]["mean"] == scores["pupil_iou"]  # one seed
            assert 0.0 <= scores["pupil_iou"] <= 1.0
    # the first test set is the run's own validation: its last epoch's row, with the EMA average
    synthetic = work / "runs" / "ema" / "synthetic" / "seed0"
    last = json.loads((synthetic / "metrics_efficientvit_model.json").read_text())[-1]
    zero_shot = next(r for r in saved["runs"] if r["trained_on"] == "synthetic")["scores"]["zero-shot"]
    assert zero_shot["pupil_iou"] == last["valid_pupil_iou"]
    args = json.loads((synthetic / "args_efficientvit_model.json").read_text())["args"]
    assert (args["ema"], args["augment"], args["alpha_floor"]) == (
        0.99, "original,photometric,geometric,occluders", 0.2)
    # the mix: the real train split and whole shards of randomized frames
    real_train = load_splits(work / "data" / "real", work / "cache")["train"].num_rows
    mixed = load_splits(work / "mixes" / "real+synthetic-randomized", work / "cache")["train"].num_rows
    assert real_train == 12 and real_train + 8 <= mixed
    table = (work / "table.md").read_text()
    assert table.count("| ema |") == 3 and table in capsys.readouterr().out
    # a rerun trains nothing and writes the same cells
    stamp = (work / "runs" / "ema" / "real" / "seed0" / "result.json").stat().st_mtime_ns
    again = bench.main(bench.get_args_parser().parse_args(argv))
    assert again["cells"] == summary["cells"] and "reused" in capsys.readouterr().out
    assert (work / "runs" / "ema" / "real" / "seed0" / "result.json").stat().st_mtime_ns == stamp
    # another schedule in the same folder would mix its runs with these
    with pytest.raises(SystemExit):
        bench.main(bench.get_args_parser().parse_args([*argv, "--epochs", "2"]))
    assert "holds runs with other epochs (epochs 1 there, 2 now)" in capsys.readouterr().err
