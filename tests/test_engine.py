"""Engine pieces in one process on the CPU: the non-finite loss watch, the epoch's reduction, the
optimizer step (backward, clipping, AMP scaler) and the learning-rate schedule.

Expected values are computed here by hand (AdamW's first step, the clipping coefficient, the cosine
factor, loss means, confusion-matrix IoUs), not by the functions under test.
"""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.errors import NonFiniteLossError
from common.specs import ELLIPSE
from common.train.engine import (
    NonFiniteWatch,
    OptimizerStep,
    Runtime,
    _finish_epoch,
    build_training,
    cosine_factor,
)
from common.train.tasks import TASKS

CPU = torch.device("cpu")
CPU_RUNTIME = Runtime(device=CPU, amp=False, compile=False, channels_last=False, pin_memory=False)
# GradScaler on the CPU: setup_runtime never turns it on there, but it is the same scaler as on CUDA.
CPU_AMP_RUNTIME = Runtime(device=CPU, amp=True, compile=False, channels_last=False, pin_memory=False)


# ----------------------------------------------------------------------------- NonFiniteWatch
def watched(losses) -> NonFiniteWatch:
    """A watch fed ``losses`` at steps 1, 2, ... as the epoch loops do."""
    watch = NonFiniteWatch(CPU)
    for step, loss in enumerate(losses, 1):
        watch.update(torch.tensor(loss), step)
    return watch


@pytest.mark.parametrize("losses, expected", [
    ([0.5, 0.4, 0.3], [0.0, math.inf, 0.0]),                                         # clean: first = inf
    ([1.0, math.nan, 2.0, math.inf, 3.0], [2.0, 2.0, 4.0]),                          # NaN and inf
    ([-math.inf, 1.0, 1.0], [1.0, 1.0, 1.0]),                                        # -inf at step 1
    ([1.0, math.nan, math.nan, math.nan, 1.0, 1.0, math.nan, 1.0], [4.0, 2.0, 7.0]),  # first..last spans gaps
])
def test_watch_counts_bad_steps_with_the_first_and_last(losses, expected):
    assert watched(losses).values.tolist() == expected


def test_watch_takes_a_half_precision_loss_that_still_has_a_graph():
    weight = torch.ones((), requires_grad=True)
    watch = NonFiniteWatch(CPU)
    watch.update((weight * 65504).half() * 2, 3)  # fp16 overflow: inf
    watch.update((weight * 2).half(), 4)
    assert watch.values.tolist() == [1.0, 3.0, 3.0]
    assert not watch.values.requires_grad


def test_check_passes_a_clean_epoch_and_names_epoch_and_steps_otherwise():
    NonFiniteWatch.check([0.0, math.inf, 0.0], "train", epoch=0, steps=5)  # no error
    with pytest.raises(NonFiniteLossError) as info:
        NonFiniteWatch.check([2.0, 3.0, 9.0], "valid", epoch=4, steps=12)
    message = str(info.value)
    assert message.startswith("valid loss was NaN or inf in epoch 5 at steps 3-9 of 12 (2 steps); ")
    assert "--lr" in message and "last good epoch" in message


# ----------------------------------------------------------------------------- _finish_epoch
class FakeTask:
    """What _finish_epoch reads of a task (cf. common/train/tasks.py): loss_terms, metric_state()
    (the tensors summed over ranks) and compute_metrics()."""

    loss_terms = ("loss", "ce", "dice")

    def __init__(self, metrics: dict):
        self.metrics = SimpleNamespace(totals=torch.tensor([3, 4], dtype=torch.int64))
        self._metrics = metrics

    def metric_state(self) -> list[torch.Tensor]:
        return [self.metrics.totals]

    def compute_metrics(self) -> dict:
        return dict(self._metrics)


def test_clean_epoch_gives_loss_means_and_metrics_under_the_split_prefix():
    task = FakeTask({"iou": 0.75, "pupil_iou": 0.5})
    sums = torch.tensor([6.0, 4.5, 1.5], dtype=torch.float64)  # three batches
    values = _finish_epoch(task, sums, 3, "train", watched([1.0, 1.0, 1.0]), epoch=0)
    assert values == {"train_loss": 2.0, "train_ce": 1.5, "train_dice": 0.5, "train_iou": 0.75,
                      "train_pupil_iou": 0.5}
    assert task.metrics.totals.tolist() == [3, 4]  # a single process: the all-reduce changes nothing


def test_epoch_without_batches_reports_zero_losses_not_nan():
    # A DDP rank can get no batch; its empty sums still take part and must not read as NaN.
    values = _finish_epoch(FakeTask({"iou": 0.5}), torch.zeros(3, dtype=torch.float64), 0, "valid",
                           NonFiniteWatch(CPU), epoch=2)
    assert values == {"valid_loss": 0.0, "valid_ce": 0.0, "valid_dice": 0.0, "valid_iou": 0.5}


def test_epoch_with_bad_steps_raises_with_the_steps_of_the_watch():
    watch = watched([1.0, math.nan, 1.0, math.inf, 1.0])
    with pytest.raises(NonFiniteLossError) as info:
        _finish_epoch(FakeTask({"iou": 0.5}), torch.ones(3, dtype=torch.float64), 5, "train", watch, epoch=6)
    assert str(info.value).startswith("train loss was NaN or inf in epoch 7 at steps 2-4 of 5 (2 steps); ")


def test_real_segmentation_task_epoch_values():
    task = TASKS["segmentation"](3, (2, 2), CPU)
    label = torch.tensor([[[0, 1], [1, 1]]])  # (1, 2, 2)
    predicted = torch.tensor([[[0, 1], [0, 1]]])
    logits = torch.stack([1.0 - predicted.float(), predicted.float()], dim=1)  # (1, 2, 2, 2)
    task.update_metrics(logits, {"label": label})
    sums = torch.tensor([6.0, 3.0, 1.5, 0.75], dtype=torch.float64)  # loss, ce, dice, surface over 3 batches
    values = _finish_epoch(task, sums, 3, "valid", NonFiniteWatch(CPU), epoch=0)
    # background: 1 pixel right of 2 predicted / 1 true -> 1/2; pupil: 2 right of 2 predicted / 3 true -> 2/3
    expected = {"valid_loss": 2.0, "valid_ce": 1.0, "valid_dice": 0.5, "valid_surface": 0.25,
                "valid_iou": (1 / 2 + 2 / 3) / 2, "valid_pupil_iou": 2 / 3, "valid_background_iou": 1 / 2}
    assert values == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- OptimizerStep
X = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1))


def loss_of(model: nn.Module, scale: float = 1.0) -> torch.Tensor:
    return model(X).pow(2).sum() * scale


def gradients(model: nn.Module, scale: float = 1.0) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_of(model, scale), list(model.parameters())))


def total_norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def test_first_step_is_the_adamw_update_by_hand():
    model = small_model()
    before = copy.deepcopy(model)
    lr, weight_decay, eps = 0.01, 0.1, 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=eps)
    OptimizerStep(CPU_RUNTIME)(loss_of(model), optimizer, model.parameters())
    for param, old, grad in zip(model.parameters(), before.parameters(), gradients(before)):
        # Step 1 after bias correction: m = g, v = g^2; weight decay is decoupled (multiplies p).
        expected = old.detach() * (1 - lr * weight_decay) - lr * grad / (grad.abs() + eps)
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(param, old)


def test_steps_match_a_plain_adamw_loop_and_drop_stale_gradients():
    model, reference = small_model(), small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    plain = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.05)
    stepper = OptimizerStep(CPU_RUNTIME)
    for _ in range(3):
        for param in model.parameters():  # left over from elsewhere: must not be added in
            param.grad = torch.full_like(param, 100.0)
        expected_grads = gradients(reference)
        stepper(loss_of(model), optimizer, model.parameters())
        for param, grad in zip(model.parameters(), expected_grads):
            assert torch.equal(param.grad, grad)  # this step's gradient only
        plain.zero_grad()
        loss_of(reference).backward()
        plain.step()
        for param, ref in zip(model.parameters(), reference.parameters()):
            assert torch.equal(param, ref)


@pytest.mark.parametrize("runtime", [CPU_RUNTIME, CPU_AMP_RUNTIME], ids=["fp32", "scaler"])
def test_clipping_bounds_the_true_gradient_norm(runtime):
    clip, scale = 0.5, 100.0
    model = small_model()
    before = copy.deepcopy(model)
    grads = gradients(before, scale)
    norm = total_norm(grads)
    assert norm > 10 * clip  # the clip must act
    stepper = OptimizerStep(runtime, clip_grad=clip)
    stepper(loss_of(model, scale), torch.optim.SGD(model.parameters(), lr=1.0), model.parameters())
    coefficient = clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s factor
    assert total_norm(p.grad for p in model.parameters()) == pytest.approx(clip, rel=1e-5)
    for param, old, grad in zip(model.parameters(), before.parameters(), grads):
        torch.testing.assert_close(param.grad, grad * coefficient, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(param.detach(), old.detach() - grad * coefficient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("clip_grad", [None, 0.0, 1e6])
def test_no_clip_or_a_loose_one_leaves_the_gradient_alone(clip_grad):
    model = small_model()
    before = copy.deepcopy(model)
    grads = gradients(before, 100.0)
    stepper = OptimizerStep(CPU_RUNTIME, clip_grad=clip_grad)
    stepper(loss_of(model, 100.0), torch.optim.SGD(model.parameters(), lr=1.0), model.parameters())
    for param, old, grad in zip(model.parameters(), before.parameters(), grads):
        assert torch.equal(param.grad, grad)
        torch.testing.assert_close(param.detach(), old.detach() - grad, rtol=0, atol=0)


def test_scaler_state_is_empty_when_disabled():
    stepper = OptimizerStep(CPU_RUNTIME)
    assert not stepper.scaler.is_enabled() and stepper.state_dict() == {}
    restored = OptimizerStep(CPU_RUNTIME)
    restored.load_state_dict(stepper.state_dict())  # what a checkpoint of a CPU run holds
    assert restored.state_dict() == {} and not restored.scaler.is_enabled()


def test_scaler_skips_a_non_finite_step_and_its_state_round_trips():
    stepper = OptimizerStep(CPU_AMP_RUNTIME)
    assert stepper.state_dict()["scale"] == 65536.0
    model = small_model()
    before = copy.deepcopy(model)
    stepper(loss_of(model, math.inf), torch.optim.SGD(model.parameters(), lr=1.0), model.parameters())
    for param, old in zip(model.parameters(), before.parameters()):
        assert torch.equal(param, old)  # the step with inf gradients was skipped
    saved = stepper.state_dict()
    assert saved["scale"] == 32768.0  # backed off by 0.5
    restored = OptimizerStep(CPU_AMP_RUNTIME)
    restored.load_state_dict(saved)
    assert restored.state_dict() == saved and restored.scaler.get_scale() == 32768.0


# ----------------------------------------------------------------------------- learning-rate schedule
def cosine_by_hand(epoch: int, epochs: int, floor: float = 0.01) -> float:
    progress = min(epoch / max(epochs - 1, 1), 1.0)
    return floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("epochs", [2, 5, 10, 100])
def test_cosine_starts_at_one_ends_at_the_floor_and_never_rises(epochs):
    factors = [cosine_factor(epoch, epochs) for epoch in range(epochs)]
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.01, abs=1e-15)
    assert all(later <= earlier for earlier, later in zip(factors, factors[1:]))
    assert cosine_factor(epochs + 3, epochs) == pytest.approx(0.01, abs=1e-15)  # past the end: the floor


@pytest.mark.parametrize("epoch, epochs, expected", [
    (5, 11, 0.505),                                          # midpoint: cos(pi / 2) = 0
    (1, 5, 0.01 + 0.99 * (1 + math.sqrt(0.5)) / 2),          # a quarter of the way: cos(pi / 4)
    (3, 5, 0.01 + 0.99 * (1 - math.sqrt(0.5)) / 2),          # three quarters: cos(3 pi / 4)
    (0, 1, 1.0),                                             # a single epoch trains at the full lr
])
def test_cosine_values_by_hand(epoch, epochs, expected):
    assert cosine_factor(epoch, epochs) == pytest.approx(expected, rel=1e-12)


def test_cosine_floor_is_a_parameter():
    assert cosine_factor(4, 5, floor=0.1) == pytest.approx(0.1, abs=1e-15)
    assert cosine_factor(2, 5, floor=0.1) == pytest.approx(0.55, rel=1e-12)


def test_build_training_schedules_lr_times_the_cosine_factor_per_epoch():
    args = SimpleNamespace(seed=3, epochs=6, lr=0.004, weight_decay=0.02, clip_grad=0.7, ema=0.0,
                           alpha_floor=0.2)
    model, task, optimizer, scheduler, stepper = build_training(args, ELLIPSE, CPU_RUNTIME, (32, 48))
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.param_groups[0]["weight_decay"] == 0.02
    assert stepper.clip_grad == 0.7 and not stepper.scaler.is_enabled()
    assert task.name == "ellipse"
    lrs = []
    for _ in range(args.epochs + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves, but the scheduler sees a step first
        scheduler.step()
    expected = [args.lr * cosine_by_hand(epoch, args.epochs) for epoch in range(args.epochs + 1)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == args.lr and lrs[args.epochs - 1] == pytest.approx(args.lr * 0.01, rel=1e-12)
    again = build_training(args, ELLIPSE, CPU_RUNTIME, (32, 48))[0]  # seeded: the same initial weights
    for param, same in zip(model.parameters(), again.parameters()):
        assert torch.equal(param, same)
