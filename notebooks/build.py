"""Build the Colab notebooks from their templates and the ``common/`` sources they use.

The template (notebooks/templates/train.py) is a Python file split into cells by ``# %%`` lines:
``# %% [markdown]`` starts a text cell (its lines are ``# ``-prefixed), ``# %% parameters`` the
papermill parameters cell, and ``# %% [common]`` is replaced by one ``%%writefile`` cell per
``common/`` module the notebook imports, directly or through other modules. So the notebook shows
all the code it runs, and the only way to change that code is to change ``common/``.
``{{INSTALLER}}`` is replaced by the source of common/notebook_install.py (the install cell runs
before the ``%%writefile`` cells, so it carries its code itself), and the other ``{{NAME}}`` fields
by the notebook's values in ``NOTEBOOKS``.

Examples:
    python notebooks/build.py            # rewrite notebooks/*.ipynb
    python notebooks/build.py --check    # exit 1 when a committed notebook differs from a fresh build
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).resolve().parent / "templates"
TEMPLATE = TEMPLATES / "train.py"
INSTALLER = ROOT / "common" / "notebook_install.py"
# What differs between the notebooks: the template's {{NAME}} fields.
NOTEBOOKS = {
    "train_efficientvit": {
        "MODEL": "TinyEfficientViTSeg",
        "PURPOSE": "for pupil segmentation",
        "INTRO": "This notebook trains **TinyEfficientViTSeg** (under 60k parameters), the VisionAssist "
                 "pupil segmenter, on preprocessed OpenEDS near-infrared eye frames, and exports it to ONNX.",
        "DATASET": "Conner/openeds-precomputed",
        "SPEC": "EFFICIENTVIT",
        "LIMIT": "60_000",
        "CURVES": "losses (total, CE, Dice, surface), mIoU and per-class IoU per epoch.",
        "PREDICTION": "prediction",
        "MAX_ONNX_KB": "300",
    },
    "train_ellipse": {
        "MODEL": "EllipseRegressionNet",
        "PURPOSE": "for the pupil ellipse",
        "INTRO": "This notebook trains **EllipseRegressionNet**, which regresses the pupil ellipse "
                 "(cx, cy, rx, ry) from near-infrared eye frames, on the preprocessed OpenEDS data, and "
                 "exports it to ONNX. It is scored as the original was: the predicted ellipse is drawn "
                 "and compared with the pupil mask.",
        "DATASET": "Conner/sddec25-01",
        "SPEC": "ELLIPSE",
        "LIMIT": "None",  # the regressor prints its own count
        "CURVES": "loss and its terms, centre and radius errors (px), drawn-ellipse mIoU and pupil IoU.",
        "PREDICTION": "predicted ellipse",
        "MAX_ONNX_KB": "None",
    },
}
COLAB_METADATA = {
    "accelerator": "GPU",
    "colab": {"gpuType": "T4", "provenance": []},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def imported_common_modules(source: str) -> set[str]:
    """Dotted ``common.*`` modules a source imports anywhere (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "common":
                found |= {f"common.{alias.name}" for alias in node.names}
            elif node.module.startswith("common."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("common.")}
    return found


def module_path(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def relative_imports(module: str, source: str) -> set[str]:
    """``from .layers import ...`` inside a package, as dotted module names."""
    package = module if module_path(module).name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(f"{package}.{node.module}")
    return found


def module_closure(roots: set[str]) -> list[str]:
    """Every common module reachable from ``roots``, with the packages that hold them, sorted."""
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module in seen or not module_path(module).exists():
            continue
        seen.add(module)
        source = module_path(module).read_text()
        todo += imported_common_modules(source) | relative_imports(module, source)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
    return sorted(seen)


def split_cells(template: str) -> list[tuple[str, str]]:
    """(kind, text) per ``# %%`` block; kind is "code", "markdown", "parameters" or "common"."""
    cells, kind, lines = [], None, []
    for line in template.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, "\n".join(lines).strip("\n")))
            marker = line[4:].strip()
            kinds = {"[markdown]": "markdown", "parameters": "parameters", "[common]": "common"}
            kind = kinds.get(marker, "code")
            lines = []
        elif kind is not None:
            lines.append(line[2:] if kind == "markdown" and line.startswith("# ") else
                         "" if kind == "markdown" and line == "#" else line)
    if kind is not None:
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def cell(kind: str, text: str, name: str, index: int) -> dict:
    cell_id = hashlib.sha1(f"{name}:{index}".encode()).hexdigest()[:8]  # stable ids: stable diffs
    lines = text.splitlines(keepends=True)
    if kind == "markdown":
        return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": lines}
    metadata = {"tags": ["parameters"]} if kind == "parameters" else {}
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": metadata,
            "outputs": [], "source": lines}


def common_cells(template: str) -> list[tuple[str, str]]:
    paths = [module_path(m) for m in module_closure(imported_common_modules(template))]
    folders = sorted({path.parent.relative_to(ROOT).as_posix() for path in paths})
    empty = [path.relative_to(ROOT).as_posix() for path in paths if not path.read_text().strip()]
    setup = [f"os.makedirs({folder!r}, exist_ok=True)" for folder in folders]
    setup += [f"open({name!r}, 'w').close()" for name in empty]  # %%writefile needs a body
    cells = [("code", "# The project's code, written to files so the cells below can import it.\n"
                      "import os\n\n" + "\n".join(setup))]
    for path in paths:
        if path.read_text().strip():
            cells.append(("code", f"%%writefile {path.relative_to(ROOT).as_posix()}\n{path.read_text()}"))
    return cells


def build(name: str) -> dict:
    template = TEMPLATE.read_text().replace("{{INSTALLER}}", INSTALLER.read_text().strip("\n"))
    for field, value in NOTEBOOKS[name].items():
        template = template.replace("{{" + field + "}}", value)
    cells = []
    for kind, text in split_cells(template):
        cells += common_cells(template) if kind == "common" else [(kind, text)]
    return {"cells": [cell(kind, text, name, i) for i, (kind, text) in enumerate(cells)],
            "metadata": COLAB_METADATA, "nbformat": 4, "nbformat_minor": 5}


def render(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(args) -> int:
    stale = []
    for name in NOTEBOOKS:
        path = Path(__file__).resolve().parent / f"{name}.ipynb"
        text = render(build(name))
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
            continue
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python notebooks/build.py", file=sys.stderr)
        return 1
    return 0


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=add_help)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
