"""Checkpoints: compiled-model round trip, resume state, atomic writes, clear errors."""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

import pytest
import torch
from torch import nn

from common import checkpoint as ckpt_module
from common.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    restore_training_state,
    save_checkpoint,
    unwrap_model,
)
from common.errors import DiskFullError
from common.models import build_model

INPUT_SIZE = (64, 96)


def _model(name: str = "shallownet", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name)


def _input(batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(batch, 1, *INPUT_SIZE, generator=generator) * 2 - 1  # (B, 1, H, W) in [-1, 1]


def _train_steps(model, optimizer, scheduler, scaler, steps: int) -> None:
    x = _input()
    target = (x[:, 0] < 0).long()  # (B, H, W) an arbitrary but fixed target
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


def _training_objects(seed: int = 0):
    model = _model(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    return model, optimizer, scheduler, scaler


def test_compiled_model_round_trip(tmp_path):
    model = _model().eval()
    x = _input()
    with torch.no_grad():
        expected = model(x)  # (B, 2, H, W) from the plain, contiguous model
    # Give the 3x3 kernels transposed strides (same values), as channels_last or weight sharing
    # can: the checkpoint must store contiguous tensors.
    kernels = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    for p in kernels:
        p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert kernels and not any(p.is_contiguous() for p in kernels)
    # The backend does not change the wrapper (OptimizedModule._orig_mod); aot_eager keeps it fast.
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        compiled(x)  # compilation is lazy: run it once so the wrapper has traced the model
    assert unwrap_model(compiled) is model

    path = save_checkpoint(tmp_path / "best.pt", model=compiled, input_size=INPUT_SIZE)

    checkpoint = load_checkpoint(path)
    keys = list(checkpoint["model"])
    assert keys == list(model.state_dict())
    assert not any("_orig_mod" in key for key in keys)
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in checkpoint["model"].values())
    assert checkpoint["model_config"]["name"] == "shallownet"
    assert list(checkpoint["model_config"]["input_size"]) == list(INPUT_SIZE)

    loaded = load_model(path, expected_name="shallownet")
    assert not loaded.training
    assert not hasattr(loaded, "_orig_mod")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_unwrap_model_strips_compile_and_data_parallel():
    model = _model()
    wrapped = nn.DataParallel(torch.compile(nn.DataParallel(model), backend="eager"))
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model


def test_training_state_round_trip_resumes_identically(tmp_path):
    model, optimizer, scheduler, scaler = _training_objects()
    _train_steps(model, optimizer, scheduler, scaler, steps=3)
    args = argparse.Namespace(data=Path("data/openeds"), lr=1e-3, size=(64, 96), compile=False)
    rng = torch.get_rng_state()
    path = save_checkpoint(
        tmp_path / "last.pt", model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        epoch=3, best_metric=0.75, args=args, input_size=INPUT_SIZE, extra={"rng": rng},
    )

    fresh_model, fresh_optimizer, fresh_scheduler, fresh_scaler = _training_objects(seed=123)
    checkpoint = load_checkpoint(path)
    epoch, best = restore_training_state(
        checkpoint, fresh_model, fresh_optimizer, fresh_scheduler, fresh_scaler
    )
    assert (epoch, best) == (3, 0.75)
    assert checkpoint["args"] == {"data": "data/openeds", "lr": 1e-3, "size": [64, 96], "compile": False}
    assert torch.equal(checkpoint["rng"], rng)
    assert fresh_scheduler.last_epoch == 3
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)  # halved once, at step 2
    assert fresh_scaler.get_scale() == scaler.get_scale() == 1024.0 * 2**3  # grew every step

    # Two more steps from the original and from the restored state give identical weights.
    _train_steps(model, optimizer, scheduler, scaler, steps=2)
    _train_steps(fresh_model, fresh_optimizer, fresh_scheduler, fresh_scaler, steps=2)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name


def test_restore_into_compiled_model(tmp_path):
    model = _model(seed=0)
    path = save_checkpoint(tmp_path / "m.pt", model=model, epoch=2, input_size=INPUT_SIZE)
    target = torch.compile(_model(seed=5), backend="eager")
    epoch, best = restore_training_state(load_checkpoint(path), target)
    assert (epoch, best) == (2, None)
    for key, value in model.state_dict().items():
        assert torch.equal(unwrap_model(target).state_dict()[key], value)


def test_resume_without_optimizer_state_is_refused(tmp_path):
    model, optimizer, _, _ = _training_objects()
    path = save_checkpoint(tmp_path / "weights_only.pt", model=model, input_size=INPUT_SIZE)
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore_training_state(load_checkpoint(path), model, optimizer)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    save_checkpoint(path, model=_model(), epoch=1, input_size=INPUT_SIZE)

    def half_written_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", half_written_save)
    with pytest.raises(DiskFullError, match="no space left on the device writing .*best.pt"):
        save_checkpoint(path, model=_model(seed=1), epoch=2, input_size=INPUT_SIZE)
    monkeypatch.undo()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temporary left behind
    assert load_checkpoint(path)["epoch"] == 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {path}"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_names_the_path(tmp_path, damage):
    path = tmp_path / "broken.pt"
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint\n")
    else:
        save_checkpoint(path, model=_model(), input_size=INPUT_SIZE)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ([1, 2, 3], "holds a list, expected a dict"),
        ({"state": {}}, r"missing keys \['model', 'model_config'\]"),
    ],
)
def test_file_that_is_not_our_checkpoint(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_of_another_model(tmp_path):
    path = save_checkpoint(tmp_path / "shallow.pt", model=_model(), input_size=INPUT_SIZE)
    with pytest.raises(CheckpointError) as info:
        load_model(path, expected_name="efficientvit")
    assert "checkpoint holds a 'shallownet' model, expected 'efficientvit'" in str(info.value)


def test_weights_that_do_not_fit_the_model(tmp_path):
    path = tmp_path / "edited.pt"
    save_checkpoint(path, model=_model(), input_size=INPUT_SIZE)
    checkpoint = load_checkpoint(path)
    removed = next(iter(checkpoint["model"]))
    del checkpoint["model"][removed]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="weights do not match the 'shallownet' model") as info:
        load_model(path)
    assert removed in str(info.value)
