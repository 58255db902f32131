"""The original project's models (common/models/original.py): their state_dict layout, how a plain
state dict is recognised, and that one loads through predict.py, export.py (fp32, INT8) and --init.

``fixtures/original_state_dict_layouts.txt`` lists every key and shape of the original's three
layouts, in order (the released best_efficientvit_model.pt, its Micro config, its ShallowNet).
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import CheckpointError, load_checkpoint, load_model
from common.infer.export import read_metadata
from common.models import build_model, count_parameters
from common.models.original import OriginalShallowNet, WindowedAttention
from common.prep import preprocess
from tests.helpers import demo_data_flags, randomize

ROOT = Path(__file__).resolve().parents[1]
LAYOUT_FILE = Path(__file__).parent / "fixtures" / "original_state_dict_layouts.txt"
ORIGINALS = {"efficientvit_original": 57_434, "efficientvit_original_micro": 7_698,
             "shallownet_original": 58_092}  # parameters


def read_layouts() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    layouts, current = {}, None
    for line in LAYOUT_FILE.read_text().splitlines():
        if line.startswith("[") and line.endswith("]"):
            current = layouts.setdefault(line[1:-1], [])
        elif line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            current.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return layouts


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def save_state_dict(model: nn.Module, path: Path) -> Path:
    """``torch.save(model.state_dict())`` as the original did: a bare dict of tensors, no wrapper."""
    torch.save(dict(model.state_dict()), path)
    return path


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_state_dict_layout_is_the_originals(name):
    model = build_model(name)
    assert layout(model) == read_layouts()[name]
    assert count_parameters(model) == ORIGINALS[name]


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_plain_state_dict_is_recognised_and_computes_the_same(name, tmp_path):
    model = randomize(build_model(name), seed=3)
    loaded = load_model(save_state_dict(model, tmp_path / "weights.pt"))
    assert loaded.model_name == name
    x = torch.rand(2, 1, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_another_config_is_read_from_the_shapes(tmp_path):
    model = randomize(build_model("efficientvit_original", embed_dims=[8, 16, 24], depths=[1, 2, 1],
                                  num_heads=[1, 2, 2], mlp_ratios=[2, 3, 2], decoder_dim=16, in_channels=1))
    checkpoint = load_checkpoint(save_state_dict(model, tmp_path / "weights.pt"))
    kwargs = checkpoint["model_config"]["kwargs"]
    assert checkpoint["model_config"]["name"] == "efficientvit_original"
    read = [kwargs[key] for key in ("embed_dims", "depths", "num_heads", "mlp_ratios", "decoder_dim")]
    assert read == [[8, 16, 24], [1, 2, 1], [1, 2, 2], [2, 3, 2], 16]
    x = torch.rand(1, 1, 40, 56) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "weights.pt")(x), model(x))


def test_compile_and_ddp_prefixes_are_stripped(tmp_path):
    model = randomize(build_model("efficientvit_original_micro"))
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "compiled.pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")
    for file in ("compiled.pt", "ddp.pt"):
        assert load_model(tmp_path / file).model_name == "efficientvit_original_micro"


def test_a_layout_of_no_known_model_is_one_line_naming_the_closest(tmp_path):
    state = build_model("efficientvit_original_micro").state_dict()
    state["encoder.stage2.blocks.0.mlp.fc1.weight"] = torch.zeros(30, 12)  # (24, 12) in the original
    torch.save(dict(state), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "odd.pt")
    message = str(info.value)
    assert "\n" not in message
    assert "closest is 'efficientvit_original_micro' (118 of its 119 tensors match)" in message
    assert ("first mismatch: encoder.stage2.blocks.0.mlp.fc1.weight has shape (30, 12), expected (24, 12)"
            in message)
    del state["encoder.stage2.blocks.0.mlp.fc1.weight"]
    state["encoder.stage2.blocks.0.mlp.fc1.weight"] = torch.zeros(24, 12)  # same tensors, one renamed
    state["decoder.head.kernel"] = state.pop("decoder.head.weight")
    torch.save(dict(state), tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="first mismatch: missing key decoder.head.weight"):
        load_model(tmp_path / "renamed.pt")


def test_every_gelu_is_exact():
    model = build_model("efficientvit_original")
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 2 + 2 + 3 + 3  # stem, downsamples, token MLPs, decoder smoothing
    assert {m.approximate for m in gelus} == {"none"}


def test_window_attention_matches_a_computation_by_hand():
    """Zero padding to whole 7x7 windows (not masked), q | k | v head-major, softmax(q k^T / sqrt(kd)) v."""
    torch.manual_seed(0)
    layer = WindowedAttention(dim=6, num_heads=2, key_dim=4, value_dim=3, window_size=7).eval()
    x = torch.randn(1, 6, 9, 10)  # padded to 14x14: windows at rows 0-6 / 7-13, columns 0-6 / 7-13
    with torch.no_grad():
        out = layer(x)
        padded = F.pad(x, (0, 4, 0, 5))[0]  # (6, 14, 14)
        tokens = padded[:, 7:14, 7:14].reshape(6, 49).T  # the bottom-right window, row-major: (49, 6)
        qkv = tokens @ layer.attn.qkv.weight.T + layer.attn.qkv.bias  # (49, 2*4 + 2*4 + 2*3)
        q, k, v = qkv[:, :8].reshape(49, 2, 4), qkv[:, 8:16].reshape(49, 2, 4), qkv[:, 16:].reshape(49, 2, 3)
        heads = [torch.softmax(q[:, h] @ k[:, h].T / 2.0, dim=-1) @ v[:, h] for h in range(2)]  # sqrt(4) = 2
        expected = torch.cat(heads, dim=1) @ layer.attn.proj.weight.T + layer.attn.proj.bias  # (49, 6)
    expected = expected.T.reshape(6, 7, 7)[:, :2, :3]  # the window's pixels inside the 9x10 map
    assert out.shape == x.shape
    assert torch.allclose(out[0, :, 7:9, 7:10], expected, atol=1e-5)


def test_original_shallownet_needs_multiples_of_8():
    model = OriginalShallowNet().eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 48, 40)).shape == (1, 2, 48, 40)
    with pytest.raises(ValueError, match="H and W must be multiples of 8, got 50x48"):
        model(torch.zeros(1, 1, 50, 48))


# ----------------------------------------------------------------------------- through the scripts
@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """A random state dict in the released checkpoint's layout, saved bare; (model, path)."""
    model = randomize(build_model("efficientvit_original"), seed=7)
    folder = tmp_path_factory.mktemp("original")
    return model, save_state_dict(model, folder / "best_efficientvit_model.pt")


def run(*args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_predict_py_runs_a_plain_state_dict(released_layout, tmp_path):
    model, path = released_layout
    frame = np.random.default_rng(0).integers(0, 256, (400, 640)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "eye.png"), frame)
    result = run("predict.py", "--model", path, "--input", tmp_path / "eye.png", "--output-dir",
                 tmp_path / "out", "--expected-model", "efficientvit_original", "--no-overlay")
    assert result.returncode == 0, result.stderr
    x = torch.from_numpy(preprocess.normalize_frame(preprocess.enhance_frame(frame)))[None, None]
    with torch.no_grad():
        logits = model(x)[0]  # (2, 400, 640) from the weights before they were saved
    expected = (logits[1] > logits[0]).numpy()
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "eye.png"), cv2.IMREAD_UNCHANGED) == 255
    assert np.array_equal(mask, expected)
    with open(tmp_path / "out" / "ellipses.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1


@pytest.mark.slow
def test_export_py_writes_fp32_and_int8_of_a_plain_state_dict(released_layout, demo_data_dir, tmp_path):
    model, path = released_layout
    fp32 = tmp_path / "fp32.onnx"
    result = run("export.py", path, "--output", fp32)
    assert result.returncode == 0, result.stderr
    assert read_metadata(fp32)["model_name"] == "efficientvit_original"
    dims = [d.dim_value for d in onnx.load(str(fp32)).graph.input[0].type.tensor_type.shape.dim[2:]]
    assert dims == [400, 640]  # a state dict records no frame size: the original's 400x640
    # Random weights predict no pupil, in fp32 and INT8 alike; --max-drop 1 keeps the check out of the way.
    int8 = tmp_path / "int8.onnx"
    result = run("export.py", path, "--int8", "--calibrate", "demo", *demo_data_flags(demo_data_dir),
                 "--calibration-frames", "8", "--output", int8, "--max-drop", "1")
    assert result.returncode == 0, result.stderr
    metadata = read_metadata(int8)
    assert metadata["model_name"] == "efficientvit_original" and metadata["precision"] == "int8"
    assert json.loads(metadata["quantization"])["calibration_frames"] == 8
    assert "int8: mean pupil IoU" in result.stdout


@pytest.mark.slow
def test_init_fine_tunes_a_plain_state_dict(released_layout, demo_data_dir, tmp_path):
    model, path = released_layout
    result = run("train_efficientvit_local.py", "--demo", *demo_data_flags(demo_data_dir),
                 "--batch-size", "8", "--num-workers", "0", "--epochs", "1", "--lr", "1e-9", "--init", path,
                 "--output-dir", tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"initialized from {path}: 'efficientvit_original' weights" in result.stdout
    checkpoint = load_checkpoint(tmp_path / "last_efficientvit_model.pt")
    assert checkpoint["model_config"]["name"] == "efficientvit_original"
    assert checkpoint["model_config"]["input_size"] == [96, 160]
    # lr 1e-9: one epoch leaves the parameters where --init put them (BN statistics do move)
    trained = checkpoint["model"]
    for key, value in model.state_dict().items():
        if key in dict(model.named_parameters()):
            assert torch.allclose(trained[key], value, atol=1e-6), key
    assert load_model(tmp_path / "best_efficientvit_model.pt").model_name == "efficientvit_original"
