"""Hand-computed checks of the device-side metrics, and that update() never syncs with the host."""

import math

import cv2
import numpy as np
import pytest
import torch

from common.infer.inference import decode_output
from common.prep import preprocess as pp
from common.train.metrics import EllipseMetrics, FrameMetrics, SegmentationMetrics, frame_outcomes
from common.train.tasks import EllipseTask, SegmentationTask

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
    assert result["pupil_iou"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["background_iou"] == pytest.approx(5 / 7, abs=1e-12)
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
    assert result["pupil_iou"] == pytest.approx(1 / 3, abs=1e-12)
    assert result["background_iou"] == pytest.approx(26 / 30, abs=1e-12)
    assert result["pixel_acc"] == pytest.approx(28 / 32, abs=1e-12)
    metrics.reset()
    metrics.update(empty, empty)
    assert metrics.compute()["pixel_acc"] == 1.0


def test_segmentation_metrics_class_absent_everywhere_is_nan_and_left_out_of_mean():
    metrics = SegmentationMetrics()
    empty = torch.zeros(2, 4, 4, dtype=torch.long)
    metrics.update(empty, empty)
    result = metrics.compute()
    assert math.isnan(result["pupil_iou"])
    assert result["background_iou"] == 1.0 and result["miou"] == 1.0 and result["pixel_acc"] == 1.0


def test_segmentation_metrics_before_any_update_are_nan():
    result = SegmentationMetrics().compute()
    assert all(math.isnan(result[key]) for key in ("background_iou", "pupil_iou", "miou", "pixel_acc"))


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
    assert result["class2_iou"] == pytest.approx(0.5, abs=1e-12)


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
H, W = 48, 64  # R = hypot(48, 64) / 2 = 40: radii that are multiples of 5 px and centres on
RADIUS_UNIT = 40.0  # dyadic fractions of the frame are exact in float32


def px(x: float, y: float, a: float, b: float) -> pp.Ellipse:
    """An axis-aligned ellipse given in pixels of the H x W test frame."""
    return pp.ellipse_from_pixels((x, y), (a, b), 0.0, H, W)


def drawn(ellipse: pp.Ellipse) -> torch.Tensor:
    return torch.from_numpy(pp.draw_ellipse(ellipse, H, W))[None]  # (1, H, W)


def as_row(ellipse: pp.Ellipse) -> torch.Tensor:
    return torch.tensor([[ellipse.cx, ellipse.cy, ellipse.rx, ellipse.ry]])


def test_the_radius_unit_is_the_half_diagonal():
    assert pp.half_diagonal(H, W) == RADIUS_UNIT
    assert EllipseMetrics(H, W).to_pixels(as_row(px(32, 24, 15, 10))).tolist() == [[32.0, 24.0, 15.0, 10.0]]
    assert as_row(px(32, 24, 15, 10)).tolist() == [[0.5, 0.5, 0.375, 0.25]]


def test_ellipse_identical_prediction_has_zero_error_and_matches_draw_ellipse():
    ellipse = px(30.7, 20.3, 13.4, 9.2)
    metrics = EllipseMetrics(H, W)
    metrics.update(as_row(ellipse), as_row(ellipse), drawn(ellipse))
    result = metrics.compute()
    assert result["center_error_px"] == 0.0 and result["radius_error_px"] == 0.0
    assert result["pupil_iou"] > 0.95 and result["background_iou"] > 0.99
    assert result["iou"] == pytest.approx((result["pupil_iou"] + result["background_iou"]) / 2, abs=1e-12)


@pytest.mark.parametrize(
    "center, axes", [((30.7, 20.3), (13.4, 9.2)), ((12.0, 30.5), (3.5, 6.0)), ((40.2, 24.0), (20.0, 17.5))]
)
def test_ellipse_rasterization_agrees_with_draw_ellipse_up_to_edge_band(center, axes):
    (cx, cy), (a, b) = center, axes
    expected = drawn(px(cx, cy, a, b))[0].numpy().astype(bool)
    ours = EllipseMetrics(H, W).draw(as_row(px(cx, cy, a, b)))[0].numpy()
    ys, xs = np.mgrid[0:H, 0:W]

    def inside(grow):  # pixel centres inside the ellipse with semi-axes grown by `grow` px
        return ((xs - cx) / (a + grow)) ** 2 + ((ys - cy) / (b + grow)) ** 2 <= 1

    assert (ours[inside(-0.5)]).all() and (expected[inside(-0.5)]).all()
    assert not ours[~inside(1.5)].any() and not expected[~inside(1.5)].any()
    disagree = ours != expected
    assert disagree.sum() < 0.12 * expected.sum()  # only part of the one-pixel band differs


def test_ellipse_draw_hand_computed_plus_shape_and_ious():
    # centre on pixel (5, 5), radii 0.6 px -> 1.1 px with the half-pixel margin: a plus sign
    metrics = EllipseMetrics(H, W)
    plus = metrics.draw(as_row(px(5, 5, 0.6, 0.6)))[0]
    assert plus.nonzero().tolist() == [[4, 5], [5, 4], [5, 5], [5, 6], [6, 5]]
    assert not metrics.draw(torch.tensor([[0.5, 0.5, 0.0, 0.2], [0.5, 0.5, -0.1, 0.2]])).any()
    # the plus against a 3x3 square: pupil IoU 5 / 9; background: (H * W - 9) / (H * W - 5)
    square = torch.zeros(1, H, W, dtype=torch.uint8)
    square[0, 4:7, 4:7] = 1
    metrics.update(as_row(px(5, 5, 0.6, 0.6)), as_row(px(5, 5, 1.0, 1.0)), square)
    result = metrics.compute()
    pupil, background = 5 / 9, (H * W - 9) / (H * W - 5)
    assert result["pupil_iou"] == pytest.approx(pupil, abs=1e-12)
    assert result["background_iou"] == pytest.approx(background, abs=1e-12)
    assert result["iou"] == pytest.approx((pupil + background) / 2, abs=1e-12)
    # |0.6 - 1.0| px on both radii; 0.6 / R is not exact in float32
    assert result["radius_error_px"] == pytest.approx(0.4, abs=1e-6)


def test_ellipse_shifted_prediction_exact_pixel_errors():
    target = px(32, 24, 15, 10)
    shifted = px(37, 36, 20, 5)  # +5 px x, +12 px y (13 px); rx +5 px, ry -5 px
    metrics = EllipseMetrics(H, W)
    metrics.update(as_row(shifted), as_row(target), drawn(target))
    metrics.update(as_row(target), as_row(target), drawn(target))
    result = metrics.compute()
    assert result["center_error_px"] == pytest.approx((13.0 + 0.0) / 2, abs=1e-12)
    assert result["radius_error_px"] == pytest.approx(((5 + 5) / 2 + 0.0) / 2, abs=1e-12)
    metrics.reset()
    assert math.isnan(metrics.compute()["center_error_px"])


def test_ellipse_ious_are_averaged_per_frame():
    # frame 1: a perfect draw; frame 2: a draw that misses the pupil entirely (pupil IoU 0)
    target = px(32, 24, 15, 10)
    mask = drawn(target).repeat(2, 1, 1)
    ours = EllipseMetrics(H, W)
    ours.update(torch.cat([as_row(target), as_row(px(5, 5, 2, 2))]), as_row(target).repeat(2, 1), mask)
    drawn_target = ours.draw(as_row(target))[0]
    truth = mask[0].bool()
    first = (drawn_target & truth).sum().item() / (drawn_target | truth).sum().item()
    assert ours.compute()["pupil_iou"] == pytest.approx((first + 0.0) / 2, abs=1e-12)


def test_ellipse_empty_masks():
    metrics = EllipseMetrics(H, W)
    empty = torch.zeros(2, H, W, dtype=torch.uint8)
    preds = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.1, 0.1]])  # draws nothing; draws a pupil
    metrics.update(preds, torch.zeros(2, 4), empty)
    result = metrics.compute()
    assert result["pupil_iou"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-12)
    assert math.isnan(result["center_error_px"]) and math.isnan(result["radius_error_px"])
    drawn_pixels = metrics.draw(preds[1:]).sum().item()
    background = (1.0 + (H * W - drawn_pixels) / (H * W)) / 2
    assert metrics.totals.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0, 2 * background, 2.0], abs=1e-12)


def test_ellipse_update_does_not_sync_and_merges(forbid_host_sync):
    target = px(32, 24, 15, 10)
    shifted = px(37, 36, 15, 10)
    mask = drawn(target)
    first, second = EllipseMetrics(H, W), EllipseMetrics(H, W)
    forbid_host_sync()
    assert first.update(as_row(shifted), as_row(target), mask).shape == (1,)  # per-frame pupil IoU
    assert second.update(as_row(target), as_row(target), mask).shape == (1,)
    first.merge(second)
    with pytest.raises(AssertionError, match="host sync"):
        first.compute()


def test_ellipse_merge_totals():
    target = px(32, 24, 15, 10)
    shifted = px(37, 36, 15, 10)
    first, second = EllipseMetrics(H, W), EllipseMetrics(H, W)
    first.update(as_row(shifted), as_row(target), drawn(target))
    second.update(as_row(target), as_row(target), drawn(target))
    first.merge(second)
    assert first.compute()["center_error_px"] == pytest.approx(6.5, abs=1e-12)
    assert first.totals[[2, 5]].tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(SegmentationMetrics())


def test_ellipse_metrics_reject_wrong_mask_size():
    with pytest.raises(ValueError, match="mask shape"):
        EllipseMetrics(H, W).update(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, H, W + 1))


# ----------------------------------------------------------------------------- per-frame metrics
FH, FW = 48, 64  # frame size of the per-frame tests
CENTRE = (30, 24)  # (x, y) pixel centre of the drawn pupils


def pupil_mask(shift=(0, 0), axes=(8, 6)) -> np.ndarray:
    """(FH, FW) uint8 0/1: a filled ellipse drawn by cv2 at CENTRE + shift (whole pixels)."""
    mask = np.zeros((FH, FW), np.uint8)
    center = (CENTRE[0] + shift[0], CENTRE[1] + shift[1])
    cv2.ellipse(mask, center, axes, 20.0, 0, 360, 1, thickness=-1)
    return mask


def stored_ellipse(mask: np.ndarray) -> list[float]:
    """What precompute stores for a label: cx, cy, rx, ry of pupil_ellipse (zeros without a pupil)."""
    return list(pp.pupil_ellipse(mask).as_tuple()[:4])


def segmentation_pass(truths, preds, batches, device="cpu"):
    """A SegmentationTask evaluation pass over frames given as masks, in ``batches`` of rows."""
    task = SegmentationTask(1, (FH, FW), device)
    task.reset_metrics(frames=len(truths))
    for rows in batches:
        label = torch.from_numpy(np.stack([truths[r] for r in rows])).long()
        logits = as_logits(torch.from_numpy(np.stack([preds[r] for r in rows])).long())
        ellipse = torch.tensor([stored_ellipse(truths[r]) for r in rows])
        task.update_metrics(logits, {"label": label, "ellipse": ellipse}, torch.tensor(rows))
    return task


def hand_frames():
    """(truths, preds): shifted 3 px (detected), 7 px (not), nothing predicted (a miss), and two
    frames without a pupil, one predicted empty and one with a false pupil."""
    empty = np.zeros((FH, FW), np.uint8)
    truths = [pupil_mask(), pupil_mask(), pupil_mask(), empty, empty]
    preds = [pupil_mask((3, 0)), pupil_mask((0, 7)), empty, empty, pupil_mask()]
    return truths, preds


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / union if union else 1.0


def test_centre_error_and_detection_rate_of_shifted_pupils():
    truths, preds = hand_frames()
    task = segmentation_pass(truths, preds, [[3, 0, 4], [1, 2]])  # rows out of order
    values = task.compute_metrics()
    outcome = frame_outcomes(task.frames.frames)
    # the fitted centre moves with the mask: errors are the shifts (to the float32 the dataset
    # stores cx, cy in: a few ulp of 30 px, ~2e-6)
    assert outcome["center_error"][:2].tolist() == pytest.approx([3.0, 7.0], abs=1e-5)
    assert outcome["center_error"][2:].isnan().all()  # a miss and two frames without a pupil
    assert outcome["detected"].tolist() == [True, False, False, False, False]
    assert values["detection_rate_5px"] == pytest.approx(1 / 3)  # the miss counts in the denominator
    assert values["center_error_px"] == pytest.approx(5.0, abs=1e-5)
    assert values["center_error_median_px"] == pytest.approx(5.0, abs=1e-5)
    assert (values["missed"], values["negatives"], values["false_pupils"]) == (1, 2, 1)
    expected_iou = [iou(t, p) for t, p in zip(truths, preds)]
    assert expected_iou[3:] == [1.0, 0.0]
    assert task.frames.frames[:, 0].tolist() == pytest.approx(expected_iou, abs=1e-12)


def test_predicted_centre_is_the_inference_decoder_fit():
    truths, preds = hand_frames()
    task = segmentation_pass(truths, preds, [[0, 1, 2, 3, 4]])
    task.compute_metrics()
    for row, pred in enumerate(preds):
        _, ellipse = decode_output(as_logits(torch.from_numpy(pred).long()[None])[0].numpy(), "segmentation",
                                   (FH, FW))
        x, y, found = task.frames.frames[row, 4:].tolist()
        if ellipse is None:
            assert found == 0
        else:
            (ex, ey), _, _ = pp.ellipse_to_pixels(ellipse, FH, FW)
            assert found == 1 and (x, y) == pytest.approx((ex, ey), abs=1e-9)


def test_per_frame_iou_distribution_of_shifted_squares():
    truth = np.zeros((FH, FW), np.uint8)
    truth[10:20, 10:20] = 1  # 10 x 10
    preds = [np.roll(truth, k, axis=1) for k in range(5)]  # IoU (10 - k) / (10 + k)
    values = segmentation_pass([truth] * 5, preds, [[0, 1], [2, 3, 4]]).compute_metrics()
    ious = sorted((10 - k) / (10 + k) for k in range(5))  # 6/14, 7/13, 8/12, 9/11, 1
    assert values["pupil_iou_median"] == pytest.approx(8 / 12, abs=1e-12)
    # 10th percentile, linear interpolation: position 0.1 * (5 - 1) = 0.4 between the two lowest
    assert values["pupil_iou_p10"] == pytest.approx(ious[0] + 0.4 * (ious[1] - ious[0]), abs=1e-12)
    assert values["pupil_iou_mean"] == pytest.approx(sum(ious) / 5, abs=1e-12)


def test_per_frame_rows_combine_exactly_across_processes():
    truths, preds = hand_frames()
    single = segmentation_pass(truths, preds, [[0, 1], [2, 3], [4]])
    ranks = [segmentation_pass(truths, preds, batches) for batches in ([[0, 1], [4]], [[2, 3]])]
    for total, *parts in zip(single.metric_state(), *(rank.metric_state() for rank in ranks)):
        assert torch.equal(sum(parts), total)  # what all_reduce(SUM) computes
    for part in ranks[1:]:
        for mine, theirs in zip(ranks[0].metric_state(), part.metric_state()):
            mine += theirs
    assert ranks[0].compute_metrics() == single.compute_metrics()


def test_per_frame_update_does_not_sync(forbid_host_sync):
    truths, preds = hand_frames()
    label = torch.from_numpy(np.stack(truths)).long()
    ellipse = torch.tensor([stored_ellipse(t) for t in truths])
    logits = as_logits(torch.from_numpy(np.stack(preds)).long())
    task = SegmentationTask(1, (FH, FW), "cpu")
    task.reset_metrics(frames=5)
    forbid_host_sync()
    task.update_metrics(logits, {"label": label, "ellipse": ellipse}, torch.arange(5))


def test_ellipse_regressor_centre_error_and_detection():
    mask = torch.from_numpy(pupil_mask()).long()[None].repeat(3, 1, 1)  # (3, FH, FW)
    target = torch.tensor([stored_ellipse(pupil_mask())] * 3)  # (3, 4)
    pred = target.clone()
    pred[0, 0] += 3 / FW  # 3 px right
    pred[1, 1] += 7 / FH  # 7 px down
    pred[2, 2:] = 0.0  # no radius: no pupil predicted
    task = EllipseTask(1, (FH, FW), "cpu")
    task.reset_metrics(frames=3)
    task.update_metrics(pred, {"label": mask, "ellipse": target}, torch.arange(3))
    values = task.compute_metrics()
    assert frame_outcomes(task.frames.frames)["center_error"][:2].tolist() == pytest.approx([3, 7], abs=1e-4)
    assert values["detection_rate_5px"] == pytest.approx(1 / 3) and values["missed"] == 1
    assert values["center_error_px"] == pytest.approx(5.0, abs=1e-4)


def test_frame_packing_round_trips_with_numpy_unpackbits():
    frames = FrameMetrics(2, 3, 13, masks=True)  # a width that is not a multiple of 8
    masks = torch.rand(2, 3, 13, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = frames.pack(masks).numpy()
    assert packed.shape == (2, 3, 2)
    np.testing.assert_array_equal(np.unpackbits(packed, axis=-1, count=13), masks.numpy())
