"""What the notebooks need, and how their install cell gets it without breaking a running kernel.

Colab's runtime comes with most packages installed (numpy, scipy, matplotlib, datasets, torch with
CUDA...), and a kernel that has imported numpy cannot take a new numpy: a later ``import scipy``
fails. So the install cell installs only the requirements this runtime does not meet (missing, or
older than the floor), and pins every distribution already installed to its current version in a
pip constraints file, so pip cannot replace one to make room. If an install still replaced a
distribution whose modules this kernel has imported (a floor above what the runtime had), the cell
says so and restarts the kernel (``os.kill(os.getpid(), SIGKILL)``, how Colab's runtime is
restarted); running all cells again then finds everything installed.

The install cell runs before the ``%%writefile`` cells write ``common/``, so notebooks/build.py
inlines this whole file into that cell: standard library and ``packaging`` only (Colab has it, and
ipykernel depends on it), no ``from __future__`` line (it would have to open the cell).
"""

import importlib.machinery
import importlib.metadata
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# Floors, not pins: the oldest versions the notebooks are tested with (Colab's own, from
# tests/colab/pip-freeze.gpu.extract.txt, for what Colab has). torch is left out on purpose:
# Colab's CUDA build stays, and elsewhere torch is installed first (pytorch.org).
NOTEBOOK_REQUIREMENTS = [
    "numpy>=2.1",
    "scipy>=1.16",
    "opencv-python-headless>=5.0",
    "datasets>=4.0",
    "pyarrow>=18.1",
    "tqdm>=4.67",
    "huggingface_hub>=1.27",
    "pyyaml>=6.0",  # YOLO data.yaml in the folder import
    "matplotlib>=3.10",
    "onnx>=1.22",  # 1.23 needs protobuf 6; Colab has 5.29
    "onnxruntime>=1.32",
    "mlflow-skinny>=3.17",  # the MLflow client; used only when MLFLOW_TRACKING_URI is set
]


class InstallError(RuntimeError):
    """pip could not install the requirements without changing an installed distribution."""


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every installed distribution (the first on sys.path wins, as for
    imports)."""
    versions = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(canonicalize_name(name), dist.version)
    return versions


def unmet(requirements: list[str], versions: dict[str, str]) -> list[str]:
    """The requirements that ``versions`` does not satisfy: missing, or outside the specifier."""
    missing = []
    for line in requirements:
        requirement = Requirement(line)
        version = versions.get(canonicalize_name(requirement.name))
        try:
            met = version is not None and requirement.specifier.contains(version, prereleases=True)
        except InvalidVersion:  # a legacy version string: let pip replace it
            met = False
        if not met:
            missing.append(line)
    return missing


def constraints(versions: dict[str, str], free: set[str]) -> str:
    """A pip constraints file pinning every distribution in ``versions`` but the ``free`` names."""
    lines = []
    for name, version in sorted(versions.items()):
        try:
            Version(version)
        except InvalidVersion:  # a legacy version pip cannot parse in a constraint: left free
            continue
        if name not in free:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def module_names(dist: importlib.metadata.Distribution) -> set[str]:
    """Dotted names of the modules a distribution's files provide (``numpy._core.multiarray``...)."""
    suffixes = sorted(importlib.machinery.all_suffixes(), key=len, reverse=True)  # ".cpython-311-...so" first
    names = set()
    for file in dist.files or []:
        parts, name = file.parts[:-1], file.name
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None or ".." in parts or "__pycache__" in parts:
            continue
        stem = name[: -len(suffix)]
        names.add(".".join(parts if stem == "__init__" else (*parts, stem)))
    return names


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Names of the distributions installed in both snapshots at different versions, sorted."""
    return sorted(name for name in before if name in after and after[name] != before[name])


def replaced(before: dict[str, str], after: dict[str, str], loaded) -> list[str]:
    """The changed distributions with a module in ``loaded`` (sys.modules), as "name old -> new":
    those modules in memory no longer match the files on disk."""
    return [f"{name} {before[name]} -> {after[name]}" for name in changed(before, after)
            if module_names(importlib.metadata.distribution(name)) & set(loaded)]


def pip_install(requirements: list[str], versions: dict[str, str]) -> None:
    """``pip install`` the requirements with everything else in ``versions`` held where it is."""
    free = {canonicalize_name(Requirement(line).name) for line in requirements}
    with tempfile.TemporaryDirectory() as folder:
        pinned = Path(folder, "installed.txt")
        pinned.write_text(constraints(versions, free))
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--prefer-binary",
                   "--upgrade-strategy", "only-if-needed", "--constraint", str(pinned), *requirements]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        print(result.stdout[-4000:] + result.stderr[-4000:])
        raise InstallError(f"pip could not install {', '.join(requirements)} (its message is above) "
                           "while holding every package this runtime already has at its version")


def ensure_requirements(requirements: list[str], kill=os.kill) -> list[str]:
    """Install what this runtime lacks; restart the kernel if that replaced an imported package.

    Returns the requirements that were installed (empty when all were met).
    """
    before = installed_versions()
    todo = unmet(requirements, before)
    if not todo:
        print("every requirement is met; nothing to install")
        return []
    print(f"installing {', '.join(todo)}; every other installed package stays at its version")
    pip_install(todo, before)
    after = installed_versions()
    added = [f"{name} {version}" for name, version in sorted(after.items()) if name not in before]
    upgraded = [f"{name} {before[name]} -> {after[name]}" for name in changed(before, after)]
    print(f"installed: {', '.join(added + upgraded) or 'nothing'}")
    stale = replaced(before, after, sys.modules)
    if stale:
        print(f"Restarting the kernel: the install replaced {', '.join(stale)}, which this kernel had "
              "already imported. Run all cells again.", flush=True)
        time.sleep(1)  # let the kernel's output thread deliver that line before the process goes
        kill(os.getpid(), signal.SIGKILL)
    return todo
