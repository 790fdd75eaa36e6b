"""The package's shape: imports run one way along the pipeline, no import circles, a public API
that resolves without loading torch, and benchmark and script modules that still import."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest
from conftest import ROOT

import dpo_core

PACKAGE = os.path.join(ROOT, "dpo_core")
# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = (
    {"errors", "console", "run_files", "run_lock", "paths", "setting"},
    {"losses"},
    {"config"},
    {"data"},
    {"modeling"},
    {"forward"},
    {"reporting"},
    {"training"},
    {"evaluation"},
    {"chat", "demo", "cli", "evaluate", "testing"},
)


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def package_modules() -> dict[str, str]:
    """dpo_core module name -> file, the entry points (`__main__`) and the package's own
    `__init__` (it names its exports as strings) left out."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py") or name == "__main__.py":
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if len(parts) > 1:
                found[".".join(parts)] = path
    return found


def internal_imports(path: str, top_level_only: bool = False) -> set[str]:
    """The dpo_core modules `path` imports (a `from package import name` counts as the
    module `package.name` when that is a module, else as `package`)."""
    modules = package_modules()
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    imported = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name.startswith("dpo_core.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_core"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                imported.add(candidate if candidate in modules else node.module)
    return {m for m in imported if m != "dpo_core"}


def test_imports_run_one_way_along_the_pipeline():
    backwards = []
    for module, path in package_modules().items():
        for target in internal_imports(path):
            if layer_of(target) > layer_of(module):
                backwards.append(f"{module} imports {target}")
    assert not backwards, backwards


def test_no_import_circles():
    modules = package_modules()
    graph = {m: internal_imports(p, top_level_only=True) & set(modules)
             for m, p in modules.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join(
                    path[path.index(target):] + [module, target]))
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_every_module_names_its_place_in_a_layer():
    for module in package_modules():
        layer_of(module)  # StopIteration: a new top-level module needs a layer


def test_public_api_resolves_and_imports_no_torch():
    for name in dpo_core.__all__:
        obj = getattr(dpo_core, name)
        assert obj.__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dpo_core.nothing  # noqa: B018
    assert set(dpo_core.__all__) <= set(dir(dpo_core))
    code = "import sys, dpo_core; print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("package", ["benchmarks", "scripts"])
def test_benchmark_and_script_modules_import(package):
    """Nothing runs these in the suite end to end (gpu_check needs CUDA): importing each catches
    a name that moved."""
    directory = os.path.join(ROOT, package)
    names = [name for _, name, _ in pkgutil.iter_modules([directory])]
    assert names
    sys.path.insert(0, directory if package == "scripts" else ROOT)
    try:
        for name in names:
            importlib.import_module(name if package == "scripts" else f"{package}.{name}")
    finally:
        sys.path.pop(0)


def test_the_package_builds_quietly_with_its_demo_assets(tmp_path):
    """Package data is declared, so building prints no setuptools warning, and the wheel holds
    the bundled demo model and data."""
    pytest.importorskip("setuptools")
    import zipfile

    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(tmp_path), ROOT],
                          capture_output=True, text=True, check=True)
    output = done.stdout + done.stderr
    assert "BuildBackendWarning" not in output and "SetuptoolsWarning" not in output, output
    (wheel,) = tmp_path.glob("dpo_core-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "dpo_core/demo/assets/model/model.safetensors" in names
    assert "dpo_core/demo/assets/data/train.jsonl" in names
