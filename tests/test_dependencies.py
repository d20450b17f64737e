"""Every third-party module speakerid imports is declared in setup.cfg: in install_requires when the import runs as
its module loads, or at least in an extra when it is guarded (inside a function, a try, or `if TYPE_CHECKING`)."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from speakerid.training.trackers import EXTRAS as TRACKER_EXTRAS
from tests.conftest import REPO

# import name → distribution name, where they differ (importlib.metadata.packages_distributions knows only what is
# installed here; this list does not depend on that)
DISTRIBUTIONS = {"sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow", "cv2": "opencv-python"}


@dataclass(frozen=True)
class Import:
    module: str  # top-level name
    where: str  # file:line
    guarded: bool  # inside a function, a try or `if TYPE_CHECKING`: a missing package fails only where it is used
    optional: bool  # inside a try or `if TYPE_CHECKING`: the code runs without it


def _imports(path: Path, root: Path = REPO) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, guarded: bool, optional: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner_optional = optional or isinstance(child, ast.Try) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            inner = guarded or inner_optional or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                found.append(Import(name.split(".")[0], f"{path.relative_to(root)}:{child.lineno}", guarded, optional))
            visit(child, inner, inner_optional)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


def _third_party_imports() -> list[Import]:
    return [i for path in sorted((REPO / "speakerid").rglob("*.py")) for i in _imports(path)
            if i.module not in sys.stdlib_module_names and i.module != "speakerid"]


def _normalise(name: str) -> str:  # PEP 503
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(_normalise(re.match(r"[A-Za-z0-9_.-]+", line).group(0)))
    return names


@pytest.fixture(scope="module")
def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def _declared(setup_cfg) -> tuple[set[str], dict[str, set[str]]]:
    required = _requirement_names(setup_cfg["options"]["install_requires"])
    extras = {name: _requirement_names(text) for name, text in setup_cfg["options.extras_require"].items()}
    return required, extras


def test_every_third_party_import_is_declared(setup_cfg):
    required, extras = _declared(setup_cfg)
    optional = set().union(*extras.values())
    imports = _third_party_imports()
    assert {"torch", "safetensors", "sklearn", "yaml"} <= {i.module for i in imports}  # the walk sees the package
    problems = []
    for i in imports:
        dist = _normalise(DISTRIBUTIONS.get(i.module, i.module))
        if dist in required:
            continue
        if not i.guarded:
            problems.append(f"{i.where}: `import {i.module}` runs when the module loads: add {dist} to install_requires"
                            + (" (it is only in an extra)" if dist in optional else ""))
        elif dist not in optional:
            problems.append(f"{i.where}: `import {i.module}` is guarded but {dist} is in no extra of setup.cfg")
    assert not problems, "\n".join(problems)


def test_every_required_distribution_is_imported(setup_cfg):
    required, _ = _declared(setup_cfg)
    imported = {_normalise(DISTRIBUTIONS.get(i.module, i.module)) for i in _third_party_imports()}
    assert required <= imported, f"declared but never imported under speakerid/: {sorted(required - imported)}"


def test_the_test_extra_holds_what_the_tests_and_benchmarks_import(setup_cfg):
    required, extras = _declared(setup_cfg)
    local = {p.stem for folder in ("tests", "benchmarks") for p in (REPO / folder).glob("*.py")}
    local |= {p.name for p in REPO.iterdir() if p.is_dir()}  # speakerid, the front doors, tests, benchmarks
    # imports inside a test function are needed by that test; only those under a try are optional
    missing = [f"{i.where}: `import {i.module}`" for folder in ("tests", "benchmarks")
               for path in sorted((REPO / folder).rglob("*.py")) for i in _imports(path)
               if not i.optional and i.module not in sys.stdlib_module_names | local
               and _normalise(DISTRIBUTIONS.get(i.module, i.module)) not in required | extras["test"]]
    assert not missing, "add to the test extra of setup.cfg:\n" + "\n".join(missing)


def test_torchaudio_is_never_imported():  # its wheels break next to CPU torch
    assert not [i.where for i in _third_party_imports() if i.module == "torchaudio"]


def test_the_extras_people_are_told_about_exist(setup_cfg):
    _, extras = _declared(setup_cfg)
    for tracker in TRACKER_EXTRAS:  # train.log_with's error names pip install 'speakerid-toolkit[TRACKER]'
        assert _normalise(tracker) in extras[tracker]
    assert {"onnx", "onnxscript", "onnxruntime"} <= extras["export"]
    assert {"av"} <= extras["m4a"] and {"matplotlib"} <= extras["plot"]
    # [all] is every extra but the test tools; [test] is everything the suite imports
    everything = set().union(*(names for name, names in extras.items() if name not in ("all", "test")))
    assert extras["all"] == everything
    assert {"pytest", "av", "onnx", "onnxscript", "onnxruntime", "tensorboard"} <= extras["test"]


def test_the_guard_walk_tells_module_level_from_guarded_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import numpy\nfrom a.b import c\ntry:\n    import x\nexcept ImportError:\n    x = None\n"
                      "def f():\n    import y\nif TYPE_CHECKING:\n    import z\nfrom . import rel\n")
    found = {(i.module, i.guarded, i.optional) for i in _imports(source, root=tmp_path)}
    assert found == {("numpy", False, False), ("a", False, False), ("x", True, True), ("y", True, False),
                     ("z", True, True)}


def test_docs_logging_lists_every_extra(setup_cfg):
    _, extras = _declared(setup_cfg)
    page = (REPO / "docs" / "logging.md").read_text()
    assert not [name for name in extras if f"`speakerid-toolkit[{name}]`" not in page]


# What the GPU device image has (/work/.library/device/KINDS.md); benchmarks/gpu_wheels.sh must bring the rest
DEVICE_IMAGE = {"torch", "accelerate", "numpy", "scipy", "rich", "scikit-learn", "pyyaml", "safetensors"}


def test_the_device_wheels_bring_every_requirement_the_device_image_lacks(setup_cfg):
    script = (REPO / "benchmarks" / "gpu_wheels.sh").read_text()
    wheels = {_normalise(spec.split("==")[0]) for spec in re.search(r"WHEELS=\(([^)]*)\)", script).group(1).split()}
    required, _ = _declared(setup_cfg)
    missing = required - DEVICE_IMAGE - wheels
    assert not missing, f"add {', '.join(sorted(missing))} to WHEELS in benchmarks/gpu_wheels.sh (gpu_check.sh installs them)"
