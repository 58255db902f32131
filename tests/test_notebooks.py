"""The Colab notebooks: in sync with a fresh build from common/, and executed headless on CPU."""

import json
import sys
from pathlib import Path

import nbformat
import pytest

from common.notebook_install import NOTEBOOK_REQUIREMENTS
from common.train.data import ensure_demo_dataset
from tests.helpers import ROOT, run_notebook

sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

EXPECTED_FILES = {
    "train_efficientvit": ("best_efficientvit_model.pt", "best_efficientvit_model.onnx",
                           "best_efficientvit_model.int8.onnx", "training_curves_efficientvit_model.png",
                           "metrics_efficientvit_model.json"),
    "train_ellipse": ("best_ellipse_model.pt", "best_ellipse_model.onnx", "best_ellipse_model.int8.onnx",
                      "training_curves_ellipse_model.png", "metrics_ellipse_model.json"),
}
FIGURES = ("sample.png", "predictions_best.png")


@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_committed_notebook_is_a_fresh_build(name):
    committed = (ROOT / "notebooks" / f"{name}.ipynb").read_text()
    assert committed == build.render(build.build(name)), "run: python notebooks/build.py"


def test_notebook_shows_every_common_module_it_imports():
    notebook = build.build("train_efficientvit")
    written = {cell["source"][0].split()[1] for cell in notebook["cells"]
               if cell["source"] and cell["source"][0].startswith("%%writefile")}
    assert {"common/train/engine.py", "common/notebook.py", "common/models/efficientvit.py",
            "common/infer/pictures.py", "common/models/__init__.py", "common/train/__init__.py"} <= written
    # only what the notebook's imports reach: not the video viewer, the dataset check or the launcher
    assert not written & {"common/infer/video_frames.py", "common/prep/verify_dataset.py", "common/cloud.py"}
    setup = [c for c in notebook["cells"] if "".join(c["source"]).startswith("# The project's code")]
    assert len(setup) == 1 and "open('common/__init__.py', 'w').close()" in "".join(setup[0]["source"])
    assert notebook["metadata"]["accelerator"] == "GPU"
    parameters = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1 and "DATASET = " in "".join(parameters[0]["source"])


@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_template_fields_are_all_filled_and_colab_torch_is_kept(name):
    cells = ["".join(c["source"]) for c in build.build(name)["cells"]]
    source = "".join(text for text in cells if not text.startswith("%%writefile"))
    assert "{{" not in source and build.NOTEBOOKS[name]["DATASET"] in source
    # Colab's CUDA torch stays
    assert not [line for line in NOTEBOOK_REQUIREMENTS if line.startswith("torch")]


@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_install_cell_is_common_notebook_install_and_comes_before_torch(name):
    cells = ["".join(c["source"]) for c in build.build(name)["cells"] if c["cell_type"] == "code"]
    installer = (ROOT / "common" / "notebook_install.py").read_text().strip("\n")
    install = [i for i, text in enumerate(cells) if installer in text]
    assert len(install) == 1 and cells[install[0]].rstrip().endswith(
        "ensure_requirements(NOTEBOOK_REQUIREMENTS)")
    torch_first = min(i for i, text in enumerate(cells) if "import torch" in text)
    assert install[0] < torch_first  # no cell before the install imports torch (and so numpy)
    assert not any(text.startswith("%%writefile") for text in cells[:install[0]])


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("nb-data"), 16, 0, (64, 96))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_notebook_runs_headless_on_cpu(name, tiny_dataset, tmp_path, monkeypatch):
    notebook = nbformat.reads(json.dumps(build.build(name)), as_version=4)
    out, work, text = run_notebook(notebook, tiny_dataset, tmp_path, monkeypatch)
    for filename in (*EXPECTED_FILES[name], *FIGURES):
        assert (out / filename).is_file(), filename
    engine = Path("common", "train", "engine.py")
    assert (work / engine).read_text() == (ROOT / engine).read_text()
    assert "every requirement is met; nothing to install" in text  # the dev environment has them all
    assert "No GPU found: training will use the CPU" in text and "final validation mIoU" in text
    assert "model files:" in text and "max |onnxruntime - torch|" in text
    assert "int8: mean pupil IoU" in text and ".int8.onnx" in text
