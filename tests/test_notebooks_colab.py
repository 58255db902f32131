"""The notebooks on a stand-in for a fresh Colab GPU runtime, with a real pip install in the notebook.

How the stand-in mimics Colab:
- Packages: a fresh venv (``python -m venv`` under tmp) with the versions Colab's published pip freeze
  lists (tests/colab/pip-freeze.gpu.extract.txt: numpy 2.1.3, scipy 1.16.3, matplotlib 3.10.0,
  datasets 4.0.0, protobuf 5.29.6, ipykernel 6.17.1...), plus torch==2.13.0, the only torch this
  machine has: Colab has torch 2.11.0+cu128 (CUDA), which cannot be installed here. Python is this
  interpreter's (3.11); Colab's is 3.12 or 3.13.
- ``google.colab``: a stand-in package in the venv's site-packages (``google/`` stays a namespace
  package, so protobuf's ``google.protobuf`` still imports) whose ``files.download`` prints the path.
  The notebooks' ``IN_COLAB`` is ``"google.colab" in sys.modules``.
- The kernel: a kernelspec for the venv (``ipykernel install --prefix`` under tmp, found through
  JUPYTER_PATH: nothing global changes) whose environment sets IPYTHONDIR to a folder whose startup
  file imports ``google.colab`` and ``numpy`` before the first cell, as a Colab kernel has them loaded.
  A numpy replaced after that breaks ``import scipy`` and ``import matplotlib`` in the same kernel.

The notebook's install cell then runs pip for real in that venv (from the package index or the
local pip cache), exactly as in Colab. Only train_efficientvit runs here (test_notebooks.py runs
both on the dev environment): the venv and the install take most of this test's time.
"""

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from common.train.data import ensure_demo_dataset
from tests.helpers import pins, run_notebook

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ROOT / "tests" / "colab" / "pip-freeze.gpu.extract.txt"
TORCH = "torch==2.13.0"  # Colab: 2.11.0+cu128
KERNEL = "colab-standin"
STARTUP = "import google.colab  # noqa: F401\nimport numpy  # noqa: F401\n"
PROBE = "import json, sys\nprint(json.dumps([m in sys.modules for m in ('google.colab', 'numpy', 'torch')]))"
VERSIONS = ("import json\nfrom common.notebook_install import installed_versions\n"
            "print(json.dumps(installed_versions()))")


def venv_versions(python: Path) -> dict[str, str]:
    result = subprocess.run([str(python), "-c", VERSIONS], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout)


def execute(cells: list[str], work: Path) -> nbformat.NotebookNode:
    """A notebook of ``cells`` run on the stand-in kernel in ``work``; raises as nbclient does, with the
    outputs so far on the exception's ``notebook``."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(text) for text in cells])
    try:
        NotebookClient(notebook, timeout=600, kernel_name=KERNEL,
                       resources={"metadata": {"path": str(work)}}).execute()
    except Exception as exc:
        exc.notebook = notebook
        raise
    return notebook


def make_colab_kernel(root: Path) -> Path:
    """The venv, the google.colab stand-in and the kernelspec under ``root``; returns the venv's python."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--prefer-binary", "--no-compile",
                    "-r", str(EXTRACT), TORCH], check=True, timeout=1200)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    colab = Path(site, "google", "colab")
    colab.mkdir(parents=True)
    (colab / "__init__.py").write_text('"""Stand-in for Colab\'s google.colab (tests only)."""\n')
    (colab / "files.py").write_text("def download(path):\n    print(f'download: {path}')\n")
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text(STARTUP)
    subprocess.run([str(python), "-m", "ipykernel", "install", "--prefix", str(root / "jupyter"),
                    "--name", KERNEL], check=True, capture_output=True)
    spec_path = root / "jupyter" / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    spec = json.loads(spec_path.read_text())
    spec["env"] = {"IPYTHONDIR": str(root / "ipython")}
    spec_path.write_text(json.dumps(spec))
    return python


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """(venv python, JUPYTER_PATH, pip cache dir, tiny dataset) of one Colab stand-in for this module."""
    root = tmp_path_factory.mktemp("colab")
    python = make_colab_kernel(root)
    cache = subprocess.run([str(python), "-m", "pip", "cache", "dir"], capture_output=True, text=True,
                           check=False).stdout  # empty when pip's cache is off
    dataset = ensure_demo_dataset(root / "data", 16, 0, (64, 96))
    return python, str(root / "jupyter" / "share" / "jupyter"), cache.strip(), dataset


@pytest.fixture
def colab_env(colab, monkeypatch):
    _, jupyter_path, cache, _ = colab
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    if cache:
        monkeypatch.setenv("PIP_CACHE_DIR", cache)  # HOME moves under tmp: keep pip's cache
    return colab


@pytest.mark.slow
def test_the_stand_in_kernel_starts_like_colab(colab_env, tmp_path):
    notebook = execute([PROBE], tmp_path)
    assert json.loads(notebook.cells[0].outputs[0]["text"]) == [True, True, False]


@pytest.mark.slow
def test_notebook_runs_on_a_fresh_colab_runtime(colab_env, tmp_path, monkeypatch):
    python, _, _, dataset = colab_env
    before = venv_versions(python)
    assert {name: before[name] for name in pins(EXTRACT)} == pins(EXTRACT)  # Colab's versions
    notebook = nbformat.read(ROOT / "notebooks" / "train_efficientvit.ipynb", as_version=4)
    out, _, text = run_notebook(notebook, dataset, tmp_path, monkeypatch, kernel_name=KERNEL)
    assert "running in Colab: True" in text and "installing onnx>=" in text
    assert "Restarting the kernel" not in text and "final validation mIoU" in text
    assert f"download: {out / 'best_efficientvit_model.onnx'}" in text
    after = venv_versions(python)
    assert {name: version for name, version in after.items() if name in before} == before  # nothing replaced
    assert {"onnx", "onnxruntime", "mlflow-skinny"} <= set(after) - set(before)


@pytest.mark.slow
def test_install_that_needs_a_newer_installed_package_fails_instead(colab_env):
    python, *_ = colab_env
    code = "from common.notebook_install import ensure_requirements\nensure_requirements(['onnx>=1.23'])"
    result = subprocess.run([str(python), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode != 0  # onnx 1.23 needs protobuf>=6.31.1; Colab's protobuf 5.29.6 stays
    assert "ResolutionImpossible" in result.stdout  # pip's own message, shown above the error
    assert "InstallError: pip could not install onnx>=1.23 (its message is above)" in result.stderr
    assert venv_versions(python)["protobuf"] == "5.29.6"


@pytest.mark.slow
def test_install_that_replaces_an_imported_package_restarts_the_kernel(colab_env, tmp_path):
    """Last in this module: it upgrades the venv's tqdm."""
    python, *_ = colab_env
    installer = (ROOT / "common" / "notebook_install.py").read_text()
    cells = ["import tqdm", installer + "\nensure_requirements(['tqdm>4.67.3'])", "print('still running')"]
    with pytest.raises(DeadKernelError) as caught:
        execute(cells, tmp_path)
    notebook, new = caught.value.notebook, venv_versions(python)["tqdm"]
    text = "".join(output.get("text", "") for output in notebook.cells[1].outputs)
    assert f"Restarting the kernel: the install replaced tqdm 4.67.3 -> {new}" in text
    assert not notebook.cells[2].outputs
