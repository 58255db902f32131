"""Our preprocessing reproduces the original precompute that wrote ``Conner/sddec25-01``.

``fixtures/original_precompute_goldens.npz`` holds that code's outputs for 28 cases: synthetic
frames at 400x640 and 96x160, and degenerate masks (a single pixel, lines, border slivers, two
blobs, a ring, a clipped ellipse, a lid-occluded pupil). Keys are ``NN_name/<column>``.
"""

from pathlib import Path

import numpy as np
import pytest

from common.prep import preprocess

GOLDENS = Path(__file__).parent / "fixtures" / "original_precompute_goldens.npz"
ELLIPSE_TOLERANCE = 1e-6
MAP_TOLERANCE = 1e-5


def load_goldens() -> dict[str, dict[str, np.ndarray]]:
    """{case name: {column: array}} from the fixture file."""
    with np.load(GOLDENS) as archive:
        cases: dict[str, dict[str, np.ndarray]] = {}
        for key in archive.files:
            case, column = key.split("/")
            cases.setdefault(case, {})[column] = archive[key]
    return cases


CASES = load_goldens()


def test_the_fixture_holds_all_28_cases():
    assert len(CASES) == 28
    sizes = {case["raw_image"].shape for case in CASES.values()}
    assert sizes == {(400, 640), (96, 160)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_process_sample_matches_the_original(name):
    golden = CASES[name]
    row = preprocess.process_sample(golden["raw_image"], golden["raw_label"])
    np.testing.assert_array_equal(row["image"], golden["image"])
    np.testing.assert_array_equal(row["label"], golden["label"])
    ellipse = np.array([row["cx"], row["cy"], row["rx"], row["ry"]])
    np.testing.assert_allclose(ellipse, golden["ellipse_cx_cy_rx_ry"], rtol=0, atol=ELLIPSE_TOLERANCE)
    np.testing.assert_allclose(row["spatial_weights"], golden["spatial_weights"], rtol=0, atol=MAP_TOLERANCE)
    np.testing.assert_allclose(row["dist_map"], golden["dist_map"], rtol=0, atol=MAP_TOLERANCE)
    assert row["spatial_weights"].dtype == np.float32 and row["dist_map"].dtype == np.float32
