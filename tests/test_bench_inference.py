"""benchmarks/bench_inference.py: a whole frame through every stage, fp32 and INT8, on small sizes."""

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest

from common.infer.export import export_onnx
from common.infer.inference import PupilPredictor
from common.models import build_model
from common.prep import preprocess
from tests.helpers import ROOT


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_inference",
                                                  ROOT / "benchmarks" / "bench_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def test_the_stages_are_those_predictor_runs():
    """The timed stages, run one by one, give the prediction ``PupilPredictor.predict`` gives."""
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(build_model("efficientvit_micro").eval(), Path(folder) / "m.onnx",
                           input_size=(32, 48))
        predictor = PupilPredictor(path, threads=1)
        frame = bench.camera_frames(1, (64, 96), seed=0)[0]
        whole = predictor.predict(frame)
        boxed, box = predictor.letterboxed(frame)
        ready = preprocess.enhance_frame(boxed)
        staged = predictor.postprocess(predictor.outputs_prepared(ready[None])[0], box, ready)
        assert np.array_equal(staged.mask, whole.mask) and staged.ellipse == whole.ellipse
        assert bench.time_stages(predictor, [frame], runs=3, warmup=1).shape == (3, len(bench.STAGES))


def test_table_has_a_row_per_model_precision_size_and_thread_count(capsys):
    args = bench.get_args_parser().parse_args(
        ["--models", "efficientvit_micro", "--sizes", "32x48", "16x16", "--threads", "1", "0", "--runs", "3",
         "--warmup", "1", "--calibration-frames", "2", "--frame", "64x96", "--int8-layers", "linear", "all"])
    assert bench.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| efficientvit_micro")]
    assert len(rows) == 2 * 3 * 2  # sizes x precisions (fp32, two INT8 layer choices) x thread settings
    cells = [row.strip("|").split("|") for row in rows]
    assert {cell[1].strip() for cell in cells} == {"fp32", "int8 linear", "int8 all"}
    assert {cell[4].strip() for cell in cells} <= {"blocked", "plain"}  # --ort-layout auto chose one
    for cell in cells:
        median, p99 = (float(v) for v in cell[10].split("/"))  # the total
        stages = [float(v.split("/")[0]) for v in cell[6:10]]
        assert 0 < max(stages) <= median <= p99  # every frame's total holds each of its stages


def test_profile_gives_each_files_operators_and_their_shares(capsys):
    args = bench.get_args_parser().parse_args(
        ["--models", "efficientvit_micro", "--sizes", "32x48", "--threads", "1", "--runs", "3",
         "--warmup", "1", "--calibration-frames", "2", "--frame", "64x96", "--profile",
         "--ort-layout", "plain"])
    assert bench.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| efficientvit_micro")]
    profiles = [row.strip("|").split("|") for row in rows if len(row.strip("|").split("|")) == 6]
    assert [cells[1].strip() for cells in profiles] == ["fp32", "int8 linear"]
    timed = [row.strip("|").split("|") for row in rows if len(row.strip("|").split("|")) > 6]
    assert [cells[4].strip() for cells in timed] == ["plain"] * 2
    assert [cells[3].strip() for cells in profiles] == ["plain"] * 2
    for cells in profiles:
        assert float(cells[4]) > 0
        shares = dict(part.strip().split(" ", 1) for part in cells[5].split(","))  # "Conv": "38% (50)"
        quantized = cells[1].strip() != "fp32"
        assert ("QLinearConv" in shares) == quantized and ("QuantizeLinear" in shares) == quantized
        assert not any(op.startswith("Reorder") for op in shares)  # the plain layout has no reorders
        percents = [float(share.split("%")[0]) for share in shares.values()]
        assert 0 < sum(percents) <= 101  # rounded shares of the ops that take at least 1%


@pytest.mark.parametrize("text", ["400x641", "0x16", "400", "axb"])
def test_bad_sizes_are_refused_at_parse_time(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.get_args_parser().parse_args(["--sizes", text])
    assert exit_info.value.code == 2 and "error: argument --sizes" in capsys.readouterr().err
