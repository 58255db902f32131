"""Hand-computed checks of the device-side metrics, and that update() never syncs with the host."""

import math

import numpy as np
import pytest
import torch

from common import preprocess as pp
from common.metrics import EllipseMetrics, SegmentationMetrics

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def forbid_host_sync(monkeypatch):
    """Make every tensor -> Python/host conversion raise while the fixture is active."""

    def install():
        for name in SYNC_METHODS:
            def fail(*args, _name=name, **kwargs):
                raise AssertionError(f"host sync: Tensor.{_name} called")
            monkeypatch.setattr(torch.Tensor, name, fail)

    return install


def square_masks():
    """Target: 2x2 pupil at rows 1-2, cols 1-2; prediction: shifted one column right."""
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    pred = torch.zeros(1, 4, 4, dtype=torch.long)
    pred[0, 1:3, 2:4] = 1
    return pred, target


def as_logits(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float() * 4.0 - 2.0


# ----------------------------------------------------------------------------- segmentation
def test_segmentation_metrics_hand_computed_masks():
    metrics = SegmentationMetrics()
    pred, target = square_masks()
    metrics.update(pred, target)
    # pupil: intersection 2, union 6; background: intersection 10, union 14; 12 of 16 pixels right
    result = metrics.compute()
    assert result["iou_pupil"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["iou_background"] == pytest.approx(5 / 7, abs=1e-12)
    assert result["iou"] == pytest.approx([5 / 7, 1 / 3], abs=1e-12)
    assert result["miou"] == pytest.approx(11 / 21, abs=1e-12)
    assert result["pixel_acc"] == pytest.approx(0.75, abs=1e-12)
    assert metrics.confusion_matrix().tolist() == [[10, 2], [2, 2]]


def test_segmentation_metrics_accumulate_batches_and_accept_logits():
    metrics = SegmentationMetrics()
    pred, target = square_masks()
    metrics.update(as_logits(pred), target)  # logits (B, 2, H, W) are reduced by argmax
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    metrics.update(empty, empty)  # 16 more correct background pixels
    result = metrics.compute()
    assert result["iou_pupil"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["iou_background"] == pytest.approx(26 / 30, abs=1e-12)
    assert result["pixel_acc"] == pytest.approx(28 / 32, abs=1e-12)
    metrics.reset()
    metrics.update(empty, empty)
    assert metrics.compute()["pixel_acc"] == 1.0


def test_segmentation_metrics_class_absent_everywhere_is_nan_and_left_out_of_mean():
    metrics = SegmentationMetrics()
    empty = torch.zeros(2, 4, 4, dtype=torch.long)
    metrics.update(empty, empty)
    result = metrics.compute()
    assert math.isnan(result["iou_pupil"])
    assert result["iou_background"] == 1.0 and result["miou"] == 1.0 and result["pixel_acc"] == 1.0


def test_segmentation_metrics_before_any_update_are_nan():
    result = SegmentationMetrics().compute()
    assert all(math.isnan(result[key]) for key in ("iou_background", "iou_pupil", "miou", "pixel_acc"))


def test_segmentation_metrics_merge_equals_single_pass():
    pred, target = square_masks()
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    single, first, second = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    single.update(pred, target)
    single.update(empty, target)
    first.update(pred, target)
    second.update(empty, target)
    first.merge(second)  # what an all_reduce of `totals` over two processes computes
    assert torch.equal(first.totals, single.totals)
    assert first.compute() == single.compute()


def test_segmentation_metrics_generic_class_names():
    metrics = SegmentationMetrics(num_classes=3)
    metrics.update(torch.tensor([[[0, 1, 2, 2]]]), torch.tensor([[[0, 1, 2, 1]]]))
    result = metrics.compute()
    # class1: intersection 1, union 2; class2: intersection 1, union 2
    assert result["iou"] == pytest.approx([1.0, 0.5, 0.5], abs=1e-12)
    assert result["iou_class2"] == pytest.approx(0.5, abs=1e-12)


def test_segmentation_metrics_reject_bad_input():
    metrics = SegmentationMetrics()
    with pytest.raises(ValueError, match="shape"):
        metrics.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="accumulates on cpu"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long, device="meta"),
                       torch.zeros(1, 2, 2, dtype=torch.long, device="meta"))


def test_segmentation_update_does_not_sync(forbid_host_sync):
    metrics = SegmentationMetrics()
    pred, target = square_masks()
    forbid_host_sync()
    assert metrics.update(as_logits(pred), target) is None
    assert metrics.update(pred, target) is None
    with pytest.raises(AssertionError, match="host sync"):
        metrics.compute()  # the guard is live: compute() does transfer


# ----------------------------------------------------------------------------- ellipse
H, W = 64, 128  # dyadic sizes keep the normalized test values exact in float32


def drawn(ellipse: pp.Ellipse) -> torch.Tensor:
    return torch.from_numpy(pp.draw_ellipse(ellipse, H, W))[None]  # (1, H, W)


def as_row(ellipse: pp.Ellipse) -> torch.Tensor:
    return torch.tensor([[ellipse.cx, ellipse.cy, ellipse.rx, ellipse.ry]])


def test_ellipse_identical_prediction_has_zero_error_and_matches_draw_ellipse():
    ellipse = pp.Ellipse(61.3 / W, 30.7 / H, 18.4 / W, 11.2 / H, 0.0)
    metrics = EllipseMetrics(H, W)
    metrics.update(as_row(ellipse), as_row(ellipse), drawn(ellipse))
    result = metrics.compute()
    assert result["center_error_px"] == 0.0 and result["radius_error_px"] == 0.0
    assert result["ellipse_iou"] > 0.95


@pytest.mark.parametrize(
    "center, axes", [((61.3, 30.7), (18.4, 11.2)), ((20.0, 40.5), (3.5, 6.0)), ((90.2, 31.0), (30.0, 25.5))]
)
def test_ellipse_rasterization_agrees_with_draw_ellipse_up_to_edge_band(center, axes):
    (cx, cy), (a, b) = center, axes
    expected = drawn(pp.Ellipse(cx / W, cy / H, a / W, b / H, 0.0))[0].numpy().astype(bool)
    ours = EllipseMetrics(H, W).draw(torch.tensor([[cx / W, cy / H, a / W, b / H]]))[0].numpy()
    ys, xs = np.mgrid[0:H, 0:W]

    def inside(grow):  # pixel centres inside the ellipse with semi-axes grown by `grow` px
        return ((xs - cx) / (a + grow)) ** 2 + ((ys - cy) / (b + grow)) ** 2 <= 1

    assert (ours[inside(-0.5)]).all() and (expected[inside(-0.5)]).all()
    assert not ours[~inside(1.5)].any() and not expected[~inside(1.5)].any()
    disagree = ours != expected
    assert disagree.sum() < 0.1 * expected.sum()  # only part of the one-pixel band differs


def test_ellipse_draw_hand_computed_plus_shape():
    # centre on pixel (5, 5), semi-axes 0.5 px -> radius 1 px with the half-pixel margin: a plus sign
    metrics = EllipseMetrics(16, 16)
    plus = metrics.draw(torch.tensor([[5 / 16, 5 / 16, 0.5 / 16, 0.5 / 16]]))[0]
    assert plus.nonzero().tolist() == [[4, 5], [5, 4], [5, 5], [5, 6], [6, 5]]
    assert not metrics.draw(torch.tensor([[0.5, 0.5, 0.0, 0.2], [0.5, 0.5, -0.1, 0.2]])).any()
    # IoU of the plus with a 3x3 square around it: 5 / 9
    square = torch.zeros(1, 16, 16, dtype=torch.uint8)
    square[0, 4:7, 4:7] = 1
    target = torch.tensor([[5 / 16, 5 / 16, 1 / 16, 1 / 16]])
    metrics.update(torch.tensor([[5 / 16, 5 / 16, 0.5 / 16, 0.5 / 16]]), target, square)
    result = metrics.compute()
    assert result["ellipse_iou"] == pytest.approx(5 / 9, abs=1e-6)
    assert result["radius_error_px"] == pytest.approx(0.5, abs=1e-12)


def test_ellipse_shifted_prediction_exact_pixel_errors():
    target = pp.Ellipse(64 / W, 32 / H, 16 / W, 12 / H, 0.0)
    shifted = pp.Ellipse(67 / W, 36 / H, 20 / W, 10 / H, 0.0)  # +3 px x, +4 px y; rx +4 px, ry -2 px
    metrics = EllipseMetrics(H, W)
    metrics.update(as_row(shifted), as_row(target), drawn(target))
    metrics.update(as_row(target), as_row(target), drawn(target))
    result = metrics.compute()
    assert result["center_error_px"] == pytest.approx((5.0 + 0.0) / 2, abs=1e-12)
    assert result["radius_error_px"] == pytest.approx(((4 + 2) / 2 + 0.0) / 2, abs=1e-12)
    metrics.reset()
    assert math.isnan(metrics.compute()["center_error_px"])


def test_ellipse_empty_masks():
    metrics = EllipseMetrics(H, W)
    empty = torch.zeros(2, H, W, dtype=torch.uint8)
    preds = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.1, 0.1]])  # draws nothing; draws a pupil
    metrics.update(preds, torch.zeros(2, 4), empty)
    result = metrics.compute()
    assert result["ellipse_iou"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-12)
    assert math.isnan(result["center_error_px"]) and math.isnan(result["radius_error_px"])
    assert metrics.totals.tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]


def test_ellipse_update_does_not_sync_and_merges(forbid_host_sync):
    target = pp.Ellipse(64 / W, 32 / H, 16 / W, 12 / H, 0.0)
    shifted = pp.Ellipse(67 / W, 36 / H, 16 / W, 12 / H, 0.0)
    mask = drawn(target)
    first, second = EllipseMetrics(H, W), EllipseMetrics(H, W)
    forbid_host_sync()
    assert first.update(as_row(shifted), as_row(target), mask) is None
    assert second.update(as_row(target), as_row(target), mask) is None
    first.merge(second)
    with pytest.raises(AssertionError, match="host sync"):
        first.compute()


def test_ellipse_merge_totals():
    target = pp.Ellipse(64 / W, 32 / H, 16 / W, 12 / H, 0.0)
    shifted = pp.Ellipse(67 / W, 36 / H, 16 / W, 12 / H, 0.0)
    first, second = EllipseMetrics(H, W), EllipseMetrics(H, W)
    first.update(as_row(shifted), as_row(target), drawn(target))
    second.update(as_row(target), as_row(target), drawn(target))
    first.merge(second)
    assert first.compute()["center_error_px"] == pytest.approx(2.5, abs=1e-12)
    assert first.totals[[2, 4]].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(SegmentationMetrics())


def test_ellipse_metrics_reject_wrong_mask_size():
    with pytest.raises(ValueError, match="mask shape"):
        EllipseMetrics(H, W).update(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, H, W + 1))
