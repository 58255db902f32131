"""common/README.md's module map, held to the code: which folder may import which, and no torch
on the launcher side."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"common.errors", "common.specs", "common.files", "common.cli", "common.progress", "common.schema",
        "common.device", "common.images", "common.checkpoint", "common.models"}
STAGES = ("common.prep", "common.infer", "common.train")  # each may import the ones before it
LAUNCHER = ("common.cloud", "common.cloud_job", "common.cli", "common.specs", "common.errors", "common.files")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """'base', a stage ('common.prep', ...) or 'top' for the module ``module``."""
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return stage
    if module in BASE or module.startswith("common.models."):
        return "base"
    return "top"


def allowed(importer: str) -> set[str]:
    kind = layer(importer)
    if kind == "base":
        return {"base"}
    if kind == "top":
        return {"base", "top", *STAGES}
    return {"base", *STAGES[: STAGES.index(kind) + 1]}


def common_imports(path: Path, module: str):
    """(imported common module, line, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + [base]).rstrip(".")
            names = [f"{base}.{alias.name}" for alias in node.names]
            targets = [name if name.rpartition(".")[0] == base and _is_module(name) else base
                       for name in names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("common"):
                yield target, node.lineno, id(node) in top_level


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = sorted((ROOT / "common").rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_imports_run_one_way(path):
    module = module_name(path)
    bad = [f"line {line}: {target} ({layer(target)})" for target, line, _ in common_imports(path, module)
           if target != "common" and layer(target) not in allowed(module)]
    assert not bad, f"{module} ({layer(module)}) may import only {sorted(allowed(module))}: {bad}"


@pytest.mark.parametrize("module", ["common.cloud", "common.cloud_job"])
def test_launcher_imports_only_launcher_modules_at_module_level(module):
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    outside = [f"line {line}: {target}" for target, line, top in common_imports(path, module)
               if top and target not in LAUNCHER]
    assert not outside


def test_launcher_side_imports_no_torch():
    code = ("import sys\nimport " + ", ".join(LAUNCHER) +
            "\nheavy = sorted(m for m in ('torch', 'numpy', 'cv2', 'datasets') if m in sys.modules)"
            "\nprint(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_map_names_every_module():
    text = (ROOT / "common" / "README.md").read_text()
    missing = [path.relative_to(ROOT / "common").as_posix() for path in MODULES
               if path.name != "__init__.py" and "models" not in path.parts and f"`{path.name}`" not in text]
    assert not missing, f"common/README.md does not name {missing}"
