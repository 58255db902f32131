"""Model registry, shapes, parameter budgets, BN folding and the EfficientViT-MSRA attention parts."""

import json

import onnx
import pytest
import torch
from torch import nn

from common.infer.export import export_onnx
from common.models import (
    MODEL_NAMES,
    build_model,
    build_model_from_config,
    count_parameters,
    fuse_model,
    model_config,
)
from common.models.efficientvit import CascadedGroupAttention, LocalWindowAttention, relative_offset_index
from tests.helpers import float32_tolerance, randomize

SEGMENTATION = ("efficientvit", "efficientvit_micro", "shallownet")


@pytest.mark.parametrize("name, low, high", [
    ("efficientvit", 10_000, 60_000),
    ("efficientvit_micro", 3_000, 10_000),
    ("shallownet", 55_000, 61_000),
    ("ellipse", 10_000, 100_000),
])
def test_parameter_budget(name, low, high):
    count = count_parameters(build_model(name))
    assert low <= count < high, f"{name}: {count} parameters"


def test_count_parameters_counts_only_trainable():
    layer = nn.Linear(3, 2)  # 3*2 weights + 2 biases
    assert count_parameters(layer) == 8
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6


@pytest.mark.parametrize("name", SEGMENTATION)
@pytest.mark.parametrize("size", [(400, 640), (96, 160)])
def test_segmentation_output_shape(name, size):
    model = build_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, *size) * 2 - 1)
    assert out.shape == (1, 2, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(400, 640), (80, 128)])
def test_ellipse_output_in_unit_interval(size):
    model = randomize(build_model("ellipse"))
    with torch.no_grad():
        out = model(torch.rand(3, 1, *size) * 2 - 1)
    assert out.shape == (3, 4)
    assert ((out > 0) & (out < 1)).all()


@pytest.mark.parametrize("name", SEGMENTATION)
def test_non_multiple_of_16_is_rejected(name):
    model = build_model(name).eval()
    with pytest.raises(ValueError, match=r"H and W must be multiples of 16, got 100x160"):
        model(torch.zeros(1, 1, 100, 160))


def test_model_attributes_and_unknown_name():
    for name in MODEL_NAMES:
        model = build_model(name)
        assert model.model_name == name
        assert model.task == ("ellipse" if name == "ellipse" else "segmentation")
        json.dumps(model.model_kwargs)  # must be JSON-serializable
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        build_model("unet")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fuse_model_matches_and_removes_batchnorm(name):
    model = randomize(build_model(name))
    fused = fuse_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    assert fused.model_name == name
    x = torch.rand(2, 1, 64, 96) * 2 - 1
    with torch.no_grad():
        expected = model(x)
        diff = (fused(x) - expected).abs().max().item()
    assert diff < float32_tolerance(expected)


def test_config_round_trip_rebuilds_same_architecture():
    model = build_model("efficientvit", decoder_dim=12, window_size=4)
    config = model_config(model, input_size=(208, 320))
    assert config == {"name": "efficientvit", "kwargs": model.model_kwargs, "input_size": [208, 320]}
    rebuilt = build_model_from_config(json.loads(json.dumps(config)))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(randomize(model).state_dict())
    x = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_model_config_unwraps_compiled_model():
    model = build_model("efficientvit_micro")
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    assert model_config(compiled) == model_config(model)
    assert model_config(compiled)["name"] == "efficientvit_micro"


def test_relative_offset_index_by_hand():
    # window 2: points (0,0) (0,1) (1,0) (1,1); offsets |dy|,|dx| numbered in order of appearance:
    # (0,0)->0, (0,1)->1, (1,0)->2, (1,1)->3
    count, index = relative_offset_index(2)
    assert count == 4
    assert index.tolist() == [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]]
    assert relative_offset_index(5)[0] == 25  # |dy|, |dx| each in 0..4


def _head_zero_output(attn: CascadedGroupAttention, chunk: torch.Tensor) -> torch.Tensor:
    """Head 0 computed independently: softmax(q^T k * scale + bias) applied to v."""
    kd, hd, n = attn.key_dim, attn.head_dim, chunk.shape[-1] * chunk.shape[-2]
    q, k, v = attn.qkvs[0](chunk).split([kd, kd, hd], dim=1)
    q = attn.dws[0](q)
    bias = attn.attention_biases[0][attn.attention_bias_idxs]  # (N, N)
    logits = torch.einsum("bcn,bcm->bnm", q.reshape(-1, kd, n), k.reshape(-1, kd, n)) / kd ** 0.5 + bias
    out = torch.einsum("bcm,bnm->bcn", v.reshape(-1, hd, n), logits.softmax(-1))
    return out.reshape(chunk.shape[0], hd, *chunk.shape[-2:])


def test_cascaded_attention_feeds_previous_head_into_next():
    attn = randomize(CascadedGroupAttention(dim=8, key_dim=4, num_heads=2, window_size=3))
    x = torch.randn(2, 8, 3, 3)
    seen = {}
    attn.qkvs[1].register_forward_hook(lambda module, inputs, output: seen.update(head1_input=inputs[0]))
    with torch.no_grad():
        attn(x)
        expected = x[:, 4:] + _head_zero_output(attn, x[:, :4])  # cascade: own split + head 0 output
    assert torch.allclose(seen["head1_input"], expected, atol=1e-5)
    assert (seen["head1_input"] - x[:, 4:]).abs().max() > 1e-2  # not plain multi-head attention


def test_changing_head_zero_split_changes_head_one():
    attn = randomize(CascadedGroupAttention(dim=8, key_dim=4, num_heads=2, window_size=3))
    inputs = []
    attn.qkvs[1].register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    x = torch.randn(1, 8, 3, 3)
    changed = x.clone()
    changed[:, :4] += 1.0  # only head 0's split
    with torch.no_grad():
        attn(x)
        attn(changed)
    assert (inputs[0] - inputs[1]).abs().max() > 1e-3


def test_attention_bias_is_learned_and_used():
    attn = randomize(CascadedGroupAttention(dim=8, key_dim=4, num_heads=2, window_size=3))
    assert isinstance(attn.attention_biases, nn.Parameter)
    assert attn.attention_biases.shape == (2, 9)  # 3x3 window: |dy|, |dx| in 0..2
    x = torch.randn(1, 8, 3, 3)
    attn(x).sum().backward()
    assert attn.attention_biases.grad.abs().sum() > 0
    with torch.no_grad():
        before = attn(x)
        attn.attention_biases.add_(torch.linspace(-2, 2, 18).view(2, 9))
        assert (attn(x) - before).abs().max() > 1e-3


def test_window_attention_is_local_and_crops_padding():
    layer = randomize(LocalWindowAttention(dim=4, key_dim=2, num_heads=2, window_size=4))
    x = torch.randn(1, 4, 6, 9)  # padded to 8x12 internally: windows rows 0-3 / 4-7, cols 0-3 / 4-7 / 8-11
    with torch.no_grad():
        out = layer(x)
        changed = x.clone()
        changed[:, :, 0, 0] += 5.0  # inside the top-left window only
        diff = (layer(changed) - out).abs().sum(dim=1)[0]  # (6, 9)
    assert out.shape == x.shape
    assert diff[:4, :4].max() > 1e-3
    diff[:4, :4] = 0
    assert diff.max() == 0  # no other window sees the change


def test_one_head_attention_is_the_head_alone_with_no_split_or_concat_in_onnx(tmp_path):
    attn = randomize(CascadedGroupAttention(dim=8, key_dim=4, num_heads=1, window_size=3))
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(attn(x), attn.proj(_head_zero_output(attn, x)), atol=1e-5)
    # Micro's attentions all have one head: its exported graph copies no map through a Split with
    # one output or a Concat with one input
    path = export_onnx(build_model("efficientvit_micro").eval(), tmp_path / "micro.onnx", input_size=(32, 48))
    graph = onnx.load(str(path)).graph
    assert not [n.name for n in graph.node if n.op_type == "Split" and len(n.output) == 1]
    assert not [n.name for n in graph.node if n.op_type == "Concat" and len(n.input) == 1]
