"""ONNX export: parity with PyTorch, dynamic batch, one file, BN folded, static (H, W) not transposed."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from common.infer.export import export_onnx, onnx_input_size, verify_onnx
from common.models import MODEL_NAMES, build_model
from tests.helpers import float32_tolerance, randomize

SMALL = (96, 160)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path) exported at SMALL, each in its own folder."""
    result = {}
    for name in MODEL_NAMES:
        folder = tmp_path_factory.mktemp(name)
        model = randomize(build_model(name))
        result[name] = (model, export_onnx(model, folder / f"{name}.onnx", input_size=SMALL))
    return result


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_matches_pytorch(exported, name):
    model, path = exported[name]
    diff = verify_onnx(model, path, batch=2, input_size=SMALL)
    print(f"{name} {SMALL}: max abs diff {diff:.2e}")
    with torch.no_grad():
        expected = model(torch.rand(2, 1, *SMALL) * 2 - 1)  # the output's magnitude sets the rounding
    assert diff < float32_tolerance(expected)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_single_file_without_batchnorm(exported, name):
    _, path = exported[name]
    assert os.listdir(path.parent) == [path.name]  # no .data sidecar, no leftover temp file
    graph = onnx.load(str(path)).graph
    assert "BatchNormalization" not in {node.op_type for node in graph.node}
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["ellipse" if name == "ellipse" else "logits"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_static_size_and_model_name(exported, name):
    _, path = exported[name]
    assert onnx_input_size(path) == SMALL  # (H, W), not transposed
    metadata = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert metadata.custom_metadata_map["model_name"] == name


@pytest.mark.parametrize("name", ["efficientvit", "ellipse"])
def test_dynamic_batch(exported, name):
    model, path = exported[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).uniform(-1, 1, (batch, 1, *SMALL)).astype(np.float32)
        out = session.run(None, {"image": x})[0]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        assert out.shape == expected.shape == ((batch, 4) if name == "ellipse" else (batch, 2, *SMALL))
        assert np.abs(out - expected).max() < 1e-4


def test_full_size_efficientvit(tmp_path):
    model = randomize(build_model("efficientvit"))
    compiled = torch.compile(model)  # export must look through the wrapper (never compiled here)
    path = export_onnx(compiled, tmp_path / "model.onnx")
    size_kb = path.stat().st_size / 1024
    diff = verify_onnx(model, path, batch=1)
    print(f"efficientvit (400, 640): max abs diff {diff:.2e}, {size_kb:.0f} KB")
    assert onnx_input_size(path) == (400, 640)
    assert diff < 1e-4
    assert size_kb < 300


def test_export_leaves_model_untouched(tmp_path):
    model = build_model("efficientvit_micro").train()
    export_onnx(model, tmp_path / "m.onnx", input_size=SMALL)
    assert model.training
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_onnx_input_size_rejects_dynamic_spatial_axes(tmp_path):
    from common.infer.export import ExportError

    image = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["b", 1, "h", "w"])
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["b", 1, "h", "w"])
    node = onnx.helper.make_node("Identity", ["image"], ["out"])
    graph = onnx.helper.make_graph([node], "g", [image], [out])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "dyn.onnx"))
    with pytest.raises(ExportError, match="static H and W"):
        onnx_input_size(tmp_path / "dyn.onnx")


def test_dynamo_exporter_matches_pytorch(tmp_path):
    model = randomize(build_model("efficientvit_micro"))
    path = export_onnx(model, tmp_path / "micro.onnx", input_size=SMALL, dynamo=True)
    assert os.listdir(tmp_path) == ["micro.onnx"]
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert onnx_input_size(path) == SMALL
    diff = verify_onnx(model, path, batch=3, input_size=SMALL)
    print(f"efficientvit_micro (dynamo exporter) {SMALL}: max abs diff {diff:.2e}")
    assert diff < 1e-4
