"""The weights' moving average (``common/train/ema.py``, --ema): its arithmetic by hand, the optimizer
step that drives it, and its place in checkpoints (saved, restored, refused when the flags differ)."""

import argparse
import math

import pytest
import torch
from torch import nn

from common.checkpoint import (
    CheckpointError,
    TrainState,
    load_checkpoint,
    resume_training,
    save_training_checkpoint,
)
from common.cli import ema_decay, unit_fraction
from common.models import build_model
from common.train.ema import ModelEma
from common.train.engine import OptimizerStep
from common.train.runtime import Runtime

CPU_RUNTIME = Runtime(device=torch.device("cpu"), amp=False, compile=False, channels_last=False,
                      pin_memory=False)


class Small(nn.Module):
    """A linear layer and a BatchNorm: float parameters, float buffers and an integer buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(self.linear(x))


def test_decay_warms_up_to_the_given_decay():
    ema = ModelEma(Small(), decay=0.99)
    assert ema.decay_at(1) == pytest.approx(2 / 11, rel=1e-15)
    assert ema.decay_at(100) == pytest.approx(101 / 110, rel=1e-15)
    assert ema.decay_at(890) == pytest.approx(0.99, rel=1e-15)  # (1 + 890) / (10 + 890)
    assert ema.decay_at(5000) == 0.99


def test_update_is_the_weighted_mean_by_hand_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = Small()
    ema = ModelEma(model, decay=0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    model.train()(torch.randn(4, 3))  # moves the running statistics and the batch counter
    ema.update()
    d = 2 / 11  # min(0.5, (1 + 1) / (10 + 1))
    for key, value in model.state_dict().items():
        average = ema.module.state_dict()[key]
        if value.is_floating_point():
            torch.testing.assert_close(average, d * before[key] + (1 - d) * value, rtol=1e-6, atol=1e-7)
        else:
            assert key.endswith("num_batches_tracked") and average.item() == value.item() == 1
    ema.update()  # unchanged weights: the average moves only toward them
    d2 = 3 / 12
    weight = model.linear.weight
    expected = d2 * (d * before["linear.weight"] + (1 - d) * weight) + (1 - d2) * weight
    torch.testing.assert_close(ema.module.linear.weight, expected, rtol=1e-6, atol=1e-7)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_the_optimizer_step_updates_the_average_once_per_step():
    torch.manual_seed(1)
    model = Small()
    ema = ModelEma(model, decay=0.9)
    stepper = OptimizerStep(CPU_RUNTIME, clip_grad=0.0, ema=ema)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        stepper(model(torch.randn(4, 3)).pow(2).mean(), optimizer, model.parameters())
        assert ema.updates == step + 1
    assert not torch.equal(ema.module.linear.weight, model.linear.weight)


@pytest.mark.parametrize("text, value", [("0", 0.0), ("0.99", 0.99), ("0.9999", 0.9999)])
def test_ema_flag_takes_a_decay_below_one(text, value):
    assert ema_decay(text) == value


@pytest.mark.parametrize("text", ["1", "1.5", "-0.1", "nan", "x"])
def test_ema_flag_refuses_other_values(text):
    with pytest.raises(argparse.ArgumentTypeError):
        ema_decay(text)


def test_alpha_floor_flag_takes_zero_to_one():
    assert unit_fraction("0") == 0.0 and unit_fraction("1") == 1.0
    for text in ("1.01", "-0.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            unit_fraction(text)


def _trained(seed: int):
    """A segmentation model after two AdamW steps with an average of decay 0.9."""
    torch.manual_seed(seed)
    model = build_model("efficientvit_micro")
    ema = ModelEma(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    stepper = OptimizerStep(CPU_RUNTIME, ema=ema)
    for _ in range(2):
        stepper(model(torch.randn(2, 1, 32, 48)).float().pow(2).mean(), optimizer, model.parameters())
    return model, ema, optimizer, scheduler, stepper


def test_checkpoint_holds_the_average_as_model_and_the_trained_weights_apart(tmp_path):
    model, ema, optimizer, scheduler, stepper = _trained(0)
    path = save_training_checkpoint(tmp_path / "last.pt", model, optimizer, scheduler, stepper,
                                    TrainState(epoch=1, best_metric=0.5), {"ema": 0.9}, (32, 48), ema=ema)
    saved = load_checkpoint(path)
    assert saved["ema"]["decay"] == 0.9 and saved["ema"]["updates"] == 2
    for key, value in ema.module.state_dict().items():
        assert torch.equal(saved["model"][key], value)
    for key, value in model.state_dict().items():
        assert torch.equal(saved["ema"]["online"][key], value)
    assert any(not torch.equal(value, saved["ema"]["online"][key]) for key, value in saved["model"].items()
               if value.is_floating_point())

    again, ema_again, optimizer_again, scheduler_again, stepper_again = _trained(1)  # other weights
    state = resume_training(path, again, optimizer_again, scheduler_again, stepper_again, (32, 48),
                            ema=ema_again)
    assert state.epoch == 1 and ema_again.updates == 2
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(ema_again.module.state_dict()[key], value)


def test_resume_refuses_a_different_ema_setting_but_evaluation_reads_the_average(tmp_path):
    model, ema, optimizer, scheduler, stepper = _trained(0)
    with_average = save_training_checkpoint(tmp_path / "ema.pt", model, optimizer, scheduler, stepper,
                                            TrainState(epoch=1, best_metric=-math.inf), {}, (32, 48), ema=ema)
    plain = save_training_checkpoint(tmp_path / "plain.pt", model, optimizer, scheduler, stepper,
                                     TrainState(epoch=1, best_metric=-math.inf), {}, (32, 48))
    other, other_ema, other_optimizer, other_scheduler, other_stepper = _trained(1)
    with pytest.raises(CheckpointError, match="trained with --ema 0.9"):
        resume_training(with_average, other, other_optimizer, other_scheduler, other_stepper, (32, 48))
    with pytest.raises(CheckpointError, match="without a moving average"):
        resume_training(plain, other, other_optimizer, other_scheduler, other_stepper, (32, 48),
                        ema=other_ema)
    resume_training(with_average, other, other_optimizer, other_scheduler, other_stepper, (32, 48),
                    evaluate_only=True)  # --test-only scores the checkpoint's model: the average
    for key, value in ema.module.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
