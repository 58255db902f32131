"""INT8 and fp16 ONNX files: calibrated and scored on the demo dataset, refused when they lose pupil IoU.

TinyEfficientViTSeg and its Micro config are trained for a few seconds on the tiny demo dataset's
training split (module fixture). Their INT8 and fp16 files must score within 0.005 mean pupil IoU of
fp32 on its validation split, carry their metadata, and run in PupilPredictor and predict.py; an
INT8 file with every layer quantized and calibrated on black frames must be refused in one line,
leaving no file behind.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from datasets import load_dataset

from common.checkpoint import save_checkpoint
from common.errors import UserError
from common.infer.export import export_onnx, read_metadata
from common.infer.inference import PupilPredictor, mask_iou
from common.infer.quantize import linear_layers, quantize_int8
from common.models import build_model
from common.schema import DATA_DIR
from common.train.data import TRAIN_SPLIT, VALID_SPLIT, ArrowBatches, frame_chunks, open_dataset
from common.train.export_check import export_model
from tests.helpers import DEMO_SIZE, demo_args

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("efficientvit", "efficientvit_micro")
MAX_LOSS = 0.005  # mean pupil IoU that INT8 / fp16 may lose against fp32 on these tiny models
STEPS = 150


def split_arrays(data_dir, split: str):
    """(frames (N, H, W) uint8 preprocessed, masks (N, H, W) 0/1) of a split of the demo dataset."""
    dataset, layout, _ = open_dataset(demo_args(data_dir))
    rows = ArrowBatches(dataset[split], layout, ())
    return next(frame_chunks(rows, range(len(rows)), chunk=len(rows)))


def torch_pupil_iou(model, frames: np.ndarray, masks: np.ndarray) -> float:
    """Mean per-frame pupil IoU of the PyTorch model's argmax, computed here (not by the scorer)."""
    x = torch.from_numpy(frames).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, H, W) in [-1, 1]
    with torch.no_grad():
        predicted = model(x).argmax(1).numpy() == 1  # (N, H, W)
    truth = masks.astype(bool)
    return float(np.mean([(p & t).sum() / (p | t).sum() if (p | t).any() else 1.0
                          for p, t in zip(predicted, truth)]))


def train_quickly(name: str, frames: np.ndarray, masks: np.ndarray) -> torch.nn.Module:
    """A few seconds of Adam on (N, H, W) frames and masks, then exact batch-norm statistics."""
    torch.manual_seed(0)
    x = torch.from_numpy(frames).float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, H, W)
    y = torch.from_numpy(masks).long()  # (N, H, W)
    model = build_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        batch = torch.randint(0, len(x), (8,))
        logits = model(x[batch])  # (8, 2, H, W)
        pupil, truth = logits.softmax(1)[:, 1], (y[batch] == 1).float()
        dice = (2 * (pupil * truth).sum() + 1) / (pupil.sum() + truth.sum() + 1)
        loss = torch.nn.functional.cross_entropy(logits, y[batch]) + 1 - dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in model.modules():  # the running averages of a short run lag: use the data's own
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@pytest.fixture(scope="module")
def trained(demo_data_dir, tmp_path_factory):
    """name -> (model, checkpoint path, its validation pupil IoU in PyTorch)."""
    frames, masks = split_arrays(demo_data_dir, TRAIN_SPLIT)
    valid = split_arrays(demo_data_dir, VALID_SPLIT)
    folder = tmp_path_factory.mktemp("trained")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few seconds either way; avoids thread thrashing on shared CI cores
    result = {}
    try:
        for name in MODELS:
            model = train_quickly(name, frames, masks)
            iou = torch_pupil_iou(model, *valid)
            assert iou > 0.5, f"{name} did not learn the demo pupils (validation pupil IoU {iou:.3f})"
            path = save_checkpoint(folder / f"{name}.pt", model=model, input_size=DEMO_SIZE)
            result[name] = (model, path, iou)
    finally:
        torch.set_num_threads(threads)
    return result


@pytest.fixture(scope="module")
def exported(trained, demo_data_dir, tmp_path_factory):
    """(name, precision) -> PrecisionReport of its file, exported alone into its own folder."""
    reports = {}
    for name, (model, _, _) in trained.items():
        for precision in ("int8", "fp16"):
            folder = tmp_path_factory.mktemp(f"{name}-{precision}")
            reports[name, precision] = export_model(model, folder / f"{name}.{precision}.onnx", precision,
                                                    demo_args(demo_data_dir), recorded_size=DEMO_SIZE)
            print("\n".join(reports[name, precision].lines()))
    return reports


@pytest.mark.parametrize("precision", ["int8", "fp16"])
@pytest.mark.parametrize("name", MODELS)
def test_reduced_precision_loses_at_most_0005_pupil_iou(exported, trained, name, precision):
    report = exported[name, precision]
    fp32, reduced = report.scores["fp32"], report.scores[precision]
    assert fp32.frames == reduced.frames >= 8
    # the scorer's fp32 figure agrees with the PyTorch model's own argmax IoU, computed independently
    assert fp32.pupil_iou == pytest.approx(trained[name][2], abs=1e-3)
    assert fp32.pupil_iou - reduced.pupil_iou <= MAX_LOSS
    assert abs(fp32.center_error_px - reduced.center_error_px) < 0.5
    assert os.listdir(report.path.parent) == [report.path.name]  # no temporaries beside it


def int8_conv_weights(proto: onnx.ModelProto) -> list[list[int]]:
    """Shapes of the int8 4-D (convolution) weights of a QDQ model."""
    return [list(i.dims) for i in proto.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]


def pointwise_convs(model: torch.nn.Module) -> int:
    """1x1 convolutions of group 1 in a PyTorch model: what --int8-layers linear quantizes."""
    return sum(1 for m in model.modules()
               if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1)


def softmax_inputs_are_quantized(proto: onnx.ModelProto) -> bool:
    producers = {output: node.op_type for node in proto.graph.node for output in node.output}
    return all(producers.get(node.input[0]) == "DequantizeLinear"
               for node in proto.graph.node if node.op_type == "Softmax")


@pytest.mark.parametrize("name", MODELS)
def test_int8_file_is_quantized_and_keeps_its_metadata(exported, trained, name):
    path = exported[name, "int8"].path
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Softmax"} <= ops
    # the default: exactly the 1x1 convolutions are int8 (BatchNorms folded away, so the PyTorch
    # model's own 1x1 Conv2d count); the stem, depthwise convolutions and the softmax stay float
    shapes = int8_conv_weights(proto)
    assert len(shapes) == pointwise_convs(trained[name][0]) > 0
    assert all(shape[2:] == [1, 1] for shape in shapes)
    assert not softmax_inputs_are_quantized(proto)
    metadata = read_metadata(path)
    assert metadata["model_name"] == name and metadata["precision"] == "int8"
    settings = json.loads(metadata["quantization"])
    assert settings["format"] == "QDQ" and settings["calibration_method"] == "percentile"
    assert settings["layers"] == "linear"
    assert settings["calibration_frames"] >= 40  # every training frame: fewer than the default 200
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]


def test_int8_layers_all_quantizes_spatial_convolutions_and_the_attention(trained, demo_data_dir, tmp_path):
    model = trained["efficientvit_micro"][0]
    report = export_model(model, tmp_path / "micro.int8.onnx", "int8", demo_args(demo_data_dir),
                          recorded_size=DEMO_SIZE, int8_layers="all")
    proto = onnx.load(str(report.path))
    shapes = int8_conv_weights(proto)
    assert any(shape[2:] == [3, 3] and shape[1] == 1 for shape in shapes)  # depthwise and the stem
    assert len(shapes) == sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert softmax_inputs_are_quantized(proto)
    assert json.loads(read_metadata(report.path)["quantization"])["layers"] == "all"
    assert report.scores["fp32"].pupil_iou - report.scores["int8"].pupil_iou <= MAX_LOSS


def test_linear_layers_are_the_1x1_convolutions_and_weighted_matmuls(tmp_path):
    # the original project's network: Linear layers (MatMul with a weight) and attention products
    # of two activations (MatMul without one), plus 3x3 and 1x1 convolutions
    model = build_model("efficientvit_original_micro").eval()
    path = export_onnx(model, tmp_path / "original.onnx", input_size=(32, 48))
    graph = onnx.load(str(path)).graph
    chosen = set(linear_layers(graph))
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
    assert {n.name for n in matmuls if n.input[1] in weights} <= chosen
    assert not {n.name for n in matmuls if n.input[1] not in weights} & chosen  # q @ k, attn @ v
    assert any(n.input[1] not in weights for n in matmuls)  # the case above is really there
    linear = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert len(chosen) == linear + pointwise_convs(model)


def test_a_model_without_linear_layers_is_one_line_and_leaves_nothing(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 3, padding=1)).eval()
    path = export_onnx(model, tmp_path / "plain.onnx", input_size=(16, 16))
    frames = np.zeros((2, 16, 16), np.uint8)
    with pytest.raises(UserError, match="no 1x1 convolution or fully connected layer.*--int8-layers all"):
        quantize_int8(path, tmp_path / "plain.int8.onnx", frames)
    assert sorted(os.listdir(tmp_path)) == ["plain.onnx"]
    quantize_int8(path, tmp_path / "plain.int8.onnx", frames, layers="all")
    assert len(int8_conv_weights(onnx.load(str(tmp_path / "plain.int8.onnx")))) == 2


def test_a_layer_constant_over_the_calibration_frames_is_one_line_for_histogram_methods(tmp_path):
    # A freshly built network: its residual branches start at zero (BatchNorm scale 0), so those
    # outputs are constant, and a histogram of them has no range to bin.
    path = export_onnx(build_model("efficientvit_micro").eval(), tmp_path / "fresh.onnx", input_size=(32, 48))
    frames = np.random.default_rng(0).integers(0, 256, (4, 32, 48), dtype=np.uint8)
    with pytest.raises(UserError, match=r"INT8 calibration \(percentile\) failed: a layer's output is"):
        quantize_int8(path, tmp_path / "fresh.int8.onnx", frames)
    assert sorted(os.listdir(tmp_path)) == ["fresh.onnx"]  # nothing half-written, no temporary
    quantize_int8(path, tmp_path / "fresh.int8.onnx", frames, method="minmax")  # the suggested way works


def test_fp16_file_has_half_weights_and_float32_io(exported):
    path = exported["efficientvit", "fp16"].path
    proto = onnx.load(str(path))
    types = {i.data_type for i in proto.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT]
    assert read_metadata(path)["precision"] == "fp16"


def test_int8_file_runs_in_the_predictor_and_predict_py(exported, trained, demo_data_dir, tmp_path):
    int8 = exported["efficientvit", "int8"].path
    fp32_onnx = tmp_path / "fp32" / "efficientvit.onnx"
    export_model(trained["efficientvit"][0], fp32_onnx, "fp32", None, recorded_size=DEMO_SIZE)
    frames, _ = split_arrays(demo_data_dir, VALID_SPLIT)
    predictor = PupilPredictor(int8, expected_model="efficientvit")
    reference = PupilPredictor(fp32_onnx)
    assert predictor.model_name == "efficientvit" and predictor.input_size == DEMO_SIZE
    agreement = [mask_iou(predictor.predict(f).mask, reference.predict(f).mask) for f in frames]
    assert np.mean(agreement) > 0.9
    image = tmp_path / "frames" / "eye.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), frames[0])
    result = subprocess.run([sys.executable, "predict.py", "--model", str(int8), "--input", str(image),
                             "--output-dir", str(tmp_path / "out"), "--expected-model", "efficientvit"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "ellipses.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "eye.png"), cv2.IMREAD_UNCHANGED) == 255
    assert mask_iou(mask, reference.predict(frames[0]).mask) > 0.9
    assert row["found"] == str(int(reference.predict(frames[0]).ellipse is not None))


def black_training_frames(source: Path, destination: Path) -> Path:
    """A copy of the dataset folder ``source`` whose training frames are all black."""
    shutil.copytree(source, destination)
    for shard in sorted((destination / DATA_DIR).glob(f"{TRAIN_SPLIT}-*.parquet")):
        cache = str(destination.parent / "cache")
        rows = load_dataset("parquet", data_files=str(shard), cache_dir=cache)["train"]
        rows = rows.map(lambda row: {"image": np.zeros(DEMO_SIZE, np.uint8)}, features=rows.features)
        rows.to_parquet(str(shard))
    return destination


@pytest.mark.slow
def test_an_int8_file_that_loses_iou_is_refused_in_one_line(trained, demo_data_dir, tmp_path):
    # Calibrated on black frames only, every activation range collapses around the black frame's.
    source = next(demo_data_dir.glob("demo-*")) / "precomputed"
    dataset = black_training_frames(source, tmp_path / "black")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    checkpoint = shutil.copy(trained["efficientvit"][1], model_dir / "model.pt")
    scratch = tmp_path / "tmp"  # the process's temporary folder: it must be left empty
    scratch.mkdir()
    # every layer INT8: with the linear layers only, ranges collapsed this way still keep the IoU
    command = [sys.executable, "export.py", str(checkpoint), "--int8", "--int8-layers", "all",
               "--calibrate", str(dataset), "--data-dir", str(tmp_path / "data")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TMPDIR": str(scratch)})
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert errors[0].startswith("error: int8 loses ") and "nothing was written" in errors[0]
    assert errors[0].count("SQNR") == 3  # the three layers whose outputs differ most
    assert sorted(os.listdir(model_dir)) == ["model.pt"]  # no model.int8.onnx, no temporary
    # the calibration's temporaries are gone too; ".ses" is the session-id file that onnxruntime's
    # native library writes into the temporary folder whenever it loads (`python -c "import onnxruntime"`)
    assert [name for name in os.listdir(scratch) if name != ".ses"] == []
