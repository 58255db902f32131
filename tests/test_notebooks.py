"""The Colab notebooks: in sync with a fresh build from common/, and executed headless on CPU."""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from common.data import ensure_demo_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "notebooks"))
import build  # noqa: E402  (notebooks/build.py)

EXPECTED_FILES = {
    "train_efficientvit": ("best_efficientvit_model.pt", "best_efficientvit_model.onnx",
                           "training_curves_efficientvit_model.png", "metrics_efficientvit_model.json"),
    "train_ellipse": ("best_ellipse_model.pt", "best_ellipse_model.onnx",
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
    assert {"common/engine.py", "common/notebook.py", "common/models/efficientvit.py", "common/pictures.py",
            "common/models/__init__.py"} <= written
    assert "open('common/__init__.py', 'w').close()" in "".join(notebook["cells"][5]["source"])
    assert notebook["metadata"]["accelerator"] == "GPU"
    parameters = [c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1 and "DATASET = " in "".join(parameters[0]["source"])


@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_template_fields_are_all_filled_and_colab_torch_is_kept(name):
    source = "".join(line for c in build.build(name)["cells"] if "%%writefile" not in c["source"][0]
                     for line in c["source"])
    assert "{{" not in source and build.NOTEBOOKS[name]["DATASET"] in source
    assert "torch==" not in source and "numpy==" in source and "onnx==" in source


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("nb-data"), 16, 0, (64, 96))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(build.NOTEBOOKS))
def test_notebook_runs_headless_on_cpu(name, tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("VA_DATASET", str(tiny_dataset))
    monkeypatch.setenv("VA_EPOCHS", "1")
    monkeypatch.setenv("VA_BATCH_SIZE", "4")
    monkeypatch.setenv("VA_OUTPUT_DIR", str(out))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the data cache (~/.cache/openeds) stays here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    notebook = nbformat.reads(json.dumps(build.build(name)), as_version=4)
    work = tmp_path / "work"
    work.mkdir()
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()  # a failing cell raises
    for filename in (*EXPECTED_FILES[name], *FIGURES):
        assert (out / filename).is_file(), filename
    assert (work / "common" / "engine.py").read_text() == (ROOT / "common" / "engine.py").read_text()
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "No GPU found: training will use the CPU" in text and "final validation mIoU" in text
    assert "model files:" in text and "max |onnxruntime - torch|" in text
