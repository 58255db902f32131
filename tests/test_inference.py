"""Inference: predict.py end to end on synthetic eye frames with known pupil ellipses.

A small segmentation network is trained for a few seconds (module fixture) on frames with a dark
elliptical pupil; it then has to find the pupils of frames it never saw, at the model's size and
at another size (letterbox path), from images, folders and a video, via .pt and .onnx.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch

import predict
from common.checkpoint import CheckpointError, save_checkpoint
from common.errors import InputError
from common.images import as_grayscale_frame
from common.infer.export import export_onnx
from common.infer.inference import PupilPredictor, overlay
from common.models import build_model
from common.prep import preprocess
from common.prep.preprocess import Ellipse
from tests.helpers import ROOT

SEG_MODEL = "efficientvit"
MODEL_SIZE = (96, 160)  # (H, W) the network is trained and exported at
OTHER_SIZE = (240, 320)  # another aspect ratio: letterboxed to 96x128 + 16 px padding each side
CENTRE_TOL_MODEL_PX = 1.5  # pupil centre error allowed, in model-input pixels
MIN_IOU = 0.85


def eye_frame(rng: np.random.Generator, height: int, width: int):
    """Bright noisy background, mid-gray iris, dark pupil ellipse -> (uint8 (H, W), Ellipse)."""
    size = max(height, width * MODEL_SIZE[0] / MODEL_SIZE[1])  # same model-pixel size once letterboxed
    a, b = rng.uniform(0.09, 0.15, 2) * size
    x, y = rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height
    truth = preprocess.ellipse_from_pixels((x, y), (a, b), rng.uniform(0, 180), height, width)
    return draw_eye(rng, truth, height, width), truth


def draw_eye(rng: np.random.Generator, truth: Ellipse, height: int, width: int) -> np.ndarray:
    """The frame of ``eye_frame`` for a given pupil ellipse: uint8 (H, W)."""
    frame = rng.normal(175, 10, (height, width))
    iris_ellipse = Ellipse(truth.cx, truth.cy, truth.rx * 2, truth.ry * 2, truth.angle)
    iris = preprocess.draw_ellipse(iris_ellipse, height, width)
    frame[iris == 1] = rng.normal(105, 8, int(iris.sum()))
    pupil = preprocess.draw_ellipse(truth, height, width)
    frame[pupil == 1] = rng.normal(30, 6, int(pupil.sum()))
    return np.clip(frame, 0, 255).astype(np.uint8)


def model_batch(rng, n: int):
    """n training frames at the model size, preprocessed exactly as inference does."""
    frames, masks = [], []
    for _ in range(n):
        frame, truth = eye_frame(rng, *MODEL_SIZE)
        frames.append(preprocess.normalize_frame(preprocess.enhance_frame(frame)))
        masks.append(preprocess.draw_ellipse(truth, *MODEL_SIZE))
    return torch.from_numpy(np.stack(frames)[:, None]), torch.from_numpy(np.stack(masks)).long()


def segmentation_loss(logits, target):
    """Cross entropy + soft Dice of the pupil: (B, 2, H, W), (B, H, W) -> scalar."""
    pupil = logits.softmax(1)[:, 1]
    truth = (target == 1).float()
    dice = (2 * (pupil * truth).sum() + 1) / (pupil.sum() + truth.sum() + 1)
    return torch.nn.functional.cross_entropy(logits, target) + 1 - dice


def pupil_iou(model, x, y) -> float:
    with torch.no_grad():
        predicted = model(x).argmax(1) == 1
    truth = y == 1
    return ((predicted & truth).sum() / (predicted | truth).sum()).item()


def calibrate_batch_norm(model, x) -> None:
    """Replace the lagging running averages of a briefly trained net by the exact data statistics."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration pass
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A segmentation network that finds these pupils (held-out IoU > 0.9), as .pt and .onnx."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few seconds either way; avoids thread thrashing on shared CI cores
    x, y = model_batch(np.random.default_rng(0), 64)  # (64, 1, 96, 160), (64, 96, 160)
    model = build_model(SEG_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        batch = torch.randint(0, len(x), (16,))
        logits = model(x[batch])  # (16, 2, 96, 160)
        loss = segmentation_loss(logits, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9 and pupil_iou(model, x[batch], y[batch]) > 0.95:
            break
    calibrate_batch_norm(model, x)
    torch.set_num_threads(threads)
    held_out_iou = pupil_iou(model, *model_batch(np.random.default_rng(1), 16))
    assert held_out_iou > 0.9, f"the test network did not learn the synthetic pupils ({held_out_iou:.3f})"
    folder = tmp_path_factory.mktemp("model")
    pt = save_checkpoint(folder / "seg.pt", model=model, input_size=MODEL_SIZE)
    onnx = export_onnx(model, folder / "seg.onnx", input_size=MODEL_SIZE)
    return {"pt": pt, "onnx": Path(onnx), "model": model}


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """A folder of PNG frames: three at the model size, two at OTHER_SIZE. name -> truth."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(42)
    truths = {}
    for index, size in enumerate([MODEL_SIZE] * 3 + [OTHER_SIZE] * 2):
        frame, truth = eye_frame(rng, *size)
        name = f"eye{index}_{size[0]}x{size[1]}"
        cv2.imwrite(str(folder / f"{name}.png"), frame)
        truths[name] = (truth, size)
    return folder, truths


def run_predict(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, "predict.py", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_against_truth(row: dict, mask_png: Path, truth: Ellipse, size) -> None:
    height, width = size
    scale = min(MODEL_SIZE[0] / height, MODEL_SIZE[1] / width)  # model pixels per frame pixel
    (x, y), _, _ = preprocess.ellipse_to_pixels(truth, height, width)
    assert row["found"] == "1"
    assert math.hypot(float(row["cx_px"]) - x, float(row["cy_px"]) - y) < CENTRE_TOL_MODEL_PX / scale
    assert float(row["cx"]) == pytest.approx(float(row["cx_px"]) / width, abs=1e-6)
    mask = cv2.imread(str(mask_png), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    expected = preprocess.draw_ellipse(truth, height, width).astype(bool)
    predicted = mask == 255
    assert (predicted & expected).sum() / (predicted | expected).sum() > MIN_IOU


@pytest.fixture(scope="module")
def pt_run(trained, frames, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred_pt")
    result = run_predict("--model", trained["pt"], "--input", frames[0], "--output-dir", out,
                         "--expected-model", SEG_MODEL)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_folder_of_images_end_to_end(pt_run, frames):
    _, truths = frames
    rows = read_csv(pt_run / "ellipses.csv")
    assert list(rows[0]) == list(predict.CSV_COLUMNS)
    assert [Path(r["source"]).stem for r in rows] == sorted(truths)
    for row in rows:
        name = Path(row["source"]).stem
        truth, size = truths[name]
        check_against_truth(row, pt_run / "masks" / f"{name}.png", truth, size)
        drawn = cv2.imread(str(pt_run / "overlays" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert drawn.shape == (*size, 3)
    assert not list(pt_run.rglob(".tmp-*"))


@pytest.mark.slow
def test_single_image_at_another_size(trained, frames, tmp_path):
    folder, truths = frames
    name = next(n for n, (_, size) in truths.items() if size == OTHER_SIZE)
    result = run_predict("--model", trained["pt"], "--input", folder / f"{name}.png",
                         "--output-dir", tmp_path, "--no-overlay")
    assert result.returncode == 0, result.stderr
    [row] = read_csv(tmp_path / "ellipses.csv")
    check_against_truth(row, tmp_path / "masks" / f"{name}.png", *truths[name])
    assert not (tmp_path / "overlays").exists()


@pytest.mark.slow
def test_onnx_model_gives_the_same_ellipses(trained, frames, pt_run, tmp_path):
    result = run_predict("--model", trained["onnx"], "--input", frames[0], "--output-dir", tmp_path,
                         "--no-overlay", "--expected-model", SEG_MODEL)
    assert result.returncode == 0, result.stderr
    for onnx_row, pt_row in zip(read_csv(tmp_path / "ellipses.csv"), read_csv(pt_run / "ellipses.csv")):
        assert onnx_row["source"] == pt_row["source"]
        # float32 rounding may flip a pixel whose two logits tie; that moves the fit by << 0.05 px
        for key in ("cx_px", "cy_px", "semi_axis_1_px", "semi_axis_2_px"):
            assert float(onnx_row[key]) == pytest.approx(float(pt_row[key]), abs=0.05)
        name = Path(pt_row["source"]).stem
        a = cv2.imread(str(tmp_path / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(pt_run / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert np.mean(a != b) <= 1e-3


@pytest.mark.slow
def test_video_every_second_frame(trained, tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, MODEL_SIZE[::-1])
    truths = []
    for _ in range(5):
        frame, truth = eye_frame(rng, *MODEL_SIZE)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
        truths.append(truth)
    writer.release()
    out = tmp_path / "out"
    result = run_predict("--model", trained["pt"], "--input", path, "--output-dir", out, "--every", "2")
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "ellipses.csv")
    assert [int(r["frame"]) for r in rows] == [0, 2, 4]
    for row in rows:
        name = f"clip_{int(row['frame']):06d}"
        assert (out / "overlays" / f"{name}.png").is_file()
        check_against_truth(row, out / "masks" / f"{name}.png", truths[int(row["frame"])], MODEL_SIZE)


@pytest.mark.slow
def test_video_with_roi_reports_full_frame_pixels(trained, tmp_path):
    rng = np.random.default_rng(8)
    x, y = 30, 20  # the ROI's corner; the eye fills the ROI, the rest of the frame is flat
    path = tmp_path / "wide.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (MODEL_SIZE[1] + 60, MODEL_SIZE[0] + 44))
    truths = []
    for _ in range(3):
        eye, truth = eye_frame(rng, *MODEL_SIZE)
        canvas = np.full((MODEL_SIZE[0] + 44, MODEL_SIZE[1] + 60), 200, np.uint8)
        canvas[y:y + MODEL_SIZE[0], x:x + MODEL_SIZE[1]] = eye
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
        truths.append(truth)
    writer.release()
    roi = (x, y, MODEL_SIZE[1], MODEL_SIZE[0])
    out = tmp_path / "out"
    result = run_predict("--model", trained["pt"], "--input", path, "--output-dir", out, "--roi", *roi)
    assert result.returncode == 0, result.stderr
    for row in read_csv(out / "ellipses.csv"):
        in_crop = {**row, "cx_px": str(float(row["cx_px"]) - x), "cy_px": str(float(row["cy_px"]) - y)}
        name = f"wide_{int(row['frame']):06d}"
        check_against_truth(in_crop, out / "masks" / f"{name}.png", truths[int(row["frame"])], MODEL_SIZE)
    outside = run_predict("--model", trained["pt"], "--input", path, "--output-dir", out,
                          "--roi", 100, 0, 200, 50)
    assert outside.returncode != 0 and "Traceback" not in outside.stderr
    assert "lies outside the 220x140" in outside.stderr


@pytest.mark.slow
def test_unreadable_image_exits_2_without_traceback(trained, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    result = run_predict("--model", trained["pt"], "--input", bad, "--output-dir", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot read image {bad}")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "ellipses.csv").exists()


def _main_error(capsys, *argv) -> str:
    args = predict.get_args_parser().parse_args([str(a) for a in argv])
    with pytest.raises(SystemExit) as info:
        predict.main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_colour_image_is_refused_unless_grayscale(trained, frames, tmp_path, capsys):
    folder, truths = frames
    name = next(n for n, (_, size) in truths.items() if size == MODEL_SIZE)
    gray = cv2.imread(str(folder / f"{name}.png"), cv2.IMREAD_UNCHANGED)
    colour = tmp_path / f"{name}.png"
    cv2.imwrite(str(colour), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    err = _main_error(capsys, "--model", trained["pt"], "--input", colour, "--output-dir", tmp_path / "a")
    assert err == (f"error: {colour}: expected a single-channel grayscale frame, got shape "
                   f"(96, 160, 3) (pass --grayscale to convert colour images)\n")
    args = predict.get_args_parser().parse_args(
        ["--model", str(trained["pt"]), "--input", str(colour), "--output-dir", str(tmp_path / "b"),
         "--grayscale", "--no-overlay"])
    predict.main(args)
    [row] = read_csv(tmp_path / "b" / "ellipses.csv")
    check_against_truth(row, tmp_path / "b" / "masks" / f"{name}.png", *truths[name])


def test_checkpoint_of_another_model_is_refused(trained, frames, capsys, tmp_path):
    for model in (trained["pt"], trained["onnx"]):
        err = _main_error(capsys, "--model", model, "--input", frames[0], "--output-dir", tmp_path,
                          "--expected-model", "shallownet")
        assert err.startswith("error: ") and f"'{SEG_MODEL}' model, expected 'shallownet'" in err
        assert str(model) in err


@pytest.mark.parametrize(
    "filename, message",
    [("model.pt", "cannot read checkpoint"), ("model.onnx", "cannot load ONNX model")],
)
def test_corrupt_model_file_is_refused(frames, capsys, tmp_path, filename, message):
    model = tmp_path / filename
    model.write_bytes(b"\x00garbage" * 10)
    err = _main_error(capsys, "--model", model, "--input", frames[0], "--output-dir", tmp_path / "o")
    assert err.startswith(f"error: {message} {model}")


def identity_onnx(path: Path, input_type: int, input_shape, output_shape) -> Path:
    """An ONNX file whose ``image`` input goes through an Identity to its output (a foreign model)."""
    from onnx import helper

    image = helper.make_tensor_value_info("image", input_type, input_shape)
    logits = helper.make_tensor_value_info("logits", input_type, output_shape)
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [image], [logits])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.parametrize("layout", ["blocked", "auto"])
@pytest.mark.parametrize(
    "input_type, shape, message",
    [(onnx.TensorProto.UINT8, [1, 1, 32, 48], "its input 'image' is tensor(uint8)"),
     (onnx.TensorProto.FLOAT, [1, 3, 32, 48], "its input 'image' is tensor(float) [1, 3, 32, 48]"),
     (onnx.TensorProto.FLOAT, [1, 1, 32, 48], "its output 'logits' is tensor(float) [1, 1, 32, 48]")],
)
def test_onnx_file_of_another_interface_is_one_line(frames, capsys, tmp_path, layout, input_type, shape,
                                                    message):
    model = identity_onnx(tmp_path / "foreign.onnx", input_type, shape, shape)
    err = _main_error(capsys, "--model", model, "--input", frames[0], "--output-dir", tmp_path / "o",
                      "--ort-layout", layout)
    assert err.startswith(f"error: {model}: {message}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_undecodable_video_is_refused(trained, capsys, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00not a video" * 100)
    err = _main_error(capsys, "--model", trained["pt"], "--input", video, "--output-dir", tmp_path / "o")
    assert err.startswith("error: cannot ") and str(video) in err
    assert not (tmp_path / "o" / "ellipses.csv").exists()


def test_missing_input(trained, capsys, tmp_path):
    err = _main_error(capsys, "--model", trained["pt"], "--input", tmp_path / "none.png")
    assert err == f"error: input not found: {tmp_path / 'none.png'}\n"


# ----------------------------------------------------------------------------- library API
def test_frame_validation():
    assert as_grayscale_frame(np.zeros((4, 6, 1), np.uint8)).shape == (4, 6)
    message = r"^expected a single-channel grayscale frame, got shape \(4, 6, 3\)$"
    with pytest.raises(InputError, match=message):
        as_grayscale_frame(np.zeros((4, 6, 3), np.uint8))
    with pytest.raises(InputError, match="expected a uint8 frame, got dtype float32"):
        as_grayscale_frame(np.zeros((4, 6), np.float32))


def test_predictor_threshold_and_overlay(trained):
    frame, _ = eye_frame(np.random.default_rng(3), *OTHER_SIZE)
    argmax = PupilPredictor(trained["pt"]).predict(frame)
    strict = PupilPredictor(trained["pt"], threshold=0.999).predict(frame)
    assert argmax.mask.shape == OTHER_SIZE and argmax.mask.dtype == np.uint8
    assert strict.mask.sum() < argmax.mask.sum()
    assert not (strict.mask & ~argmax.mask.astype(bool)).any()  # a stricter mask is a subset
    drawn = overlay(frame, argmax)
    pupil = argmax.mask.astype(bool)
    assert drawn.shape == (*OTHER_SIZE, 3)
    assert (drawn[pupil][:, 1] >= drawn[pupil][:, 0]).all()  # green tint inside the pupil


def test_ellipse_regressor_maps_back_through_the_letterbox(tmp_path):
    torch.manual_seed(0)
    model = build_model("ellipse").eval()
    path = save_checkpoint(tmp_path / "ellipse.pt", model=model, input_size=MODEL_SIZE)
    frame = np.random.default_rng(0).integers(0, 256, (120, 160), dtype=np.uint8)
    # 120x160 -> scale 0.8 -> 96x128 content, 16 px of padding left and right of it.
    boxed = np.zeros(MODEL_SIZE, np.uint8)
    boxed[:, 16:144] = cv2.resize(frame, (128, 96), interpolation=cv2.INTER_AREA)
    model_input = preprocess.normalize_frame(preprocess.enhance_frame(boxed))[None, None]
    with torch.no_grad():
        cx, cy, rx, ry = model(torch.from_numpy(model_input))[0].tolist()
    prediction = PupilPredictor(path).predict(frame)
    # radii are in units of half the diagonal: sqrt(96^2 + 160^2) / 2 in the model, 100 px in the frame
    model_unit, frame_unit = math.hypot(96, 160) / 2, math.hypot(120, 160) / 2
    expected = ((cx * 160 - 16) / 0.8 / 160, cy * 96 / 0.8 / 120,
                rx * model_unit / 0.8 / frame_unit, ry * model_unit / 0.8 / frame_unit)
    assert prediction.ellipse.as_tuple()[:4] == pytest.approx(expected, rel=1e-5)
    assert np.array_equal(prediction.mask, preprocess.draw_ellipse(prediction.ellipse, 120, 160))


def test_predictor_refuses_wrong_model_and_missing_file(trained, tmp_path):
    with pytest.raises(CheckpointError, match="expected 'ellipse'"):
        PupilPredictor(trained["pt"], expected_model="ellipse")
    with pytest.raises(CheckpointError, match="model file not found"):
        PupilPredictor(tmp_path / "missing.pt")


def test_model_ready_frames_are_not_enhanced_again(trained):
    rng = np.random.default_rng(5)
    raw = [eye_frame(rng, *MODEL_SIZE)[0] for _ in range(3)]
    ready = np.stack([preprocess.enhance_frame(frame) for frame in raw])  # as a built dataset holds them
    predictor = PupilPredictor(trained["pt"])
    for direct, prepared in zip(predictor.predict_batch(raw), predictor.predict_prepared(ready)):
        np.testing.assert_array_equal(prepared.mask, direct.mask)
        assert prepared.ellipse == direct.ellipse
    with torch.no_grad():
        expected = trained["model"](torch.from_numpy(preprocess.normalize_frame(ready)[:, None])).numpy()
    np.testing.assert_array_equal(predictor.outputs_prepared(ready), expected)
    with pytest.raises(InputError, match=r"model-ready frames must be \(B, 96, 160\) uint8"):
        predictor.outputs_prepared(ready[:, :, :128])


def test_onnx_layouts_give_the_same_predictions_and_auto_keeps_the_faster(trained, frames):
    folder, truths = frames
    images = [cv2.imread(str(folder / f"{name}.png"), cv2.IMREAD_UNCHANGED) for name in sorted(truths)]
    blocked = PupilPredictor(trained["onnx"], threads=1)  # onnxruntime's default
    plain = PupilPredictor(trained["onnx"], threads=1, layout="plain")
    auto = PupilPredictor(trained["onnx"], threads=1, layout="auto")
    assert (blocked.layout, plain.layout) == ("blocked", "plain")
    assert blocked.layout_ms == plain.layout_ms == {}
    timed = auto.layout_ms
    assert set(timed) == {"blocked", "plain"} and min(timed.values()) > 0
    assert auto.layout == min(timed, key=timed.get)
    batch = np.stack([preprocess.enhance_frame(image) for image in images[:3]])  # the model-size frames
    blocked_logits, plain_logits = (p.outputs_prepared(batch) for p in (blocked, plain))
    assert np.abs(blocked_logits - plain_logits).max() < 1e-4  # the same function either way
    for image in images:
        a, b = blocked.predict(image), plain.predict(image)
        assert np.mean(a.mask != b.mask) <= 1e-3
    assert PupilPredictor(trained["pt"], layout="auto").layout is None  # PyTorch: nothing to choose
    with pytest.raises(InputError, match="layout must be one of blocked, plain, auto"):
        PupilPredictor(trained["onnx"], layout="nchwc")


def test_predict_py_prints_the_layout_trial_only_for_auto(trained, frames, tmp_path):
    folder, truths = frames
    image = folder / f"{sorted(truths)[0]}.png"
    auto = run_predict("--model", trained["onnx"], "--input", image, "--output-dir", tmp_path / "auto",
                       "--threads", "1")
    assert auto.returncode == 0, auto.stderr
    [line] = [line for line in auto.stdout.splitlines() if line.startswith("onnxruntime layout:")]
    assert "blocked" in line and "plain" in line and line.rsplit("using ", 1)[1] in ("blocked", "plain")
    fixed = run_predict("--model", trained["onnx"], "--input", image, "--output-dir", tmp_path / "fixed",
                        "--ort-layout", "plain")
    assert fixed.returncode == 0, fixed.stderr
    assert "onnxruntime layout" not in fixed.stdout
    assert read_csv(tmp_path / "auto" / "ellipses.csv")[0]["found"] == "1"
