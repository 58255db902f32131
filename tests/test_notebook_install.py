"""The notebooks' install cell (common/notebook_install.py): which requirements are unmet, the
constraints that hold installed packages, and which replaced packages force a kernel restart.
tests/test_notebooks_colab.py runs it for real, with pip, on a stand-in for Colab's runtime."""

import importlib.metadata
import sys
from pathlib import Path

import numpy  # noqa: F401  (loaded, as in a kernel that has run a cell)
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from common.notebook_install import (
    NOTEBOOK_REQUIREMENTS,
    constraints,
    ensure_requirements,
    installed_versions,
    module_names,
    replaced,
    unmet,
)
from tests.helpers import pins

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("versions, expected", [
    ({}, ["numpy>=2.1", "huggingface_hub>=1.27"]),                            # missing
    ({"numpy": "2.0.2", "huggingface-hub": "1.27.0"}, ["numpy>=2.1"]),        # below the floor; name spelling
    ({"numpy": "2.1.0", "huggingface-hub": "2.4.0"}, []),                     # at and above
    ({"numpy": "2.1.0rc1", "huggingface-hub": "1.28.0.dev0"}, ["numpy>=2.1"]),  # a pre-release is below 2.1
    # pip replaces what it cannot read
    ({"numpy": "2.1-legacy-build", "huggingface-hub": "1.27"}, ["numpy>=2.1"]),
])
def test_unmet_requirements(versions, expected):
    assert unmet(["numpy>=2.1", "huggingface_hub>=1.27"], versions) == expected


def test_constraints_pin_everything_installed_but_what_is_installed_now():
    text = constraints({"numpy": "2.1.3", "torch": "2.11.0+cu128", "onnx": "1.20.0", "oldpkg": "1.0-foo-bar"},
                       free={"onnx"})
    assert text == "numpy==2.1.3\ntorch==2.11.0+cu128\n"  # a legacy version pip cannot read stays free


def test_floors_leave_colab_packages_alone_and_hold_the_dev_pins():
    colab = pins(ROOT / "tests" / "colab" / "pip-freeze.gpu.extract.txt")
    assert [line.split(">=")[0] for line in unmet(NOTEBOOK_REQUIREMENTS, colab)] == \
        ["onnx", "onnxruntime", "mlflow-skinny"]  # Colab lacks these; it has everything else
    dev = pins(ROOT / "requirements.txt")
    assert unmet(NOTEBOOK_REQUIREMENTS, dev) == []  # the dev environment (headless test) meets every floor
    floors = {canonicalize_name(Requirement(line).name) for line in NOTEBOOK_REQUIREMENTS}
    assert set(dev) - floors == {"torch", "kaggle", "modal", "onnxscript"}  # not needed by the notebooks


def test_module_names_cover_extensions_and_namespace_packages():
    numpy_modules = module_names(importlib.metadata.distribution("numpy"))
    assert {"numpy", "numpy._core._multiarray_umath", "numpy.linalg"} <= numpy_modules  # .so and package
    protobuf_modules = module_names(importlib.metadata.distribution("protobuf"))
    assert "google.protobuf" in protobuf_modules and "google" not in protobuf_modules  # a namespace


def test_replaced_names_only_changed_distributions_with_loaded_modules():
    after = installed_versions()
    before = {**after, "numpy": "1.0", "protobuf": "1.0", "scipy": "1.0"}
    loaded = {"numpy": 0, "google": 0, "google.colab": 0}  # google.colab shares protobuf's namespace
    assert replaced(before, after, loaded) == [f"numpy 1.0 -> {after['numpy']}"]
    assert replaced(before, after, {**loaded, "google.protobuf": 0}) == \
        [f"numpy 1.0 -> {after['numpy']}", f"protobuf 1.0 -> {after['protobuf']}"]
    assert replaced(after, after, sys.modules) == []


def test_nothing_to_install_leaves_the_kernel_alone(capsys):
    kills = []
    assert ensure_requirements(NOTEBOOK_REQUIREMENTS, kill=lambda *a: kills.append(a)) == []
    assert capsys.readouterr().out == "every requirement is met; nothing to install\n" and not kills
