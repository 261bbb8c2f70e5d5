"""Every third-party module the project imports is declared in pyproject.toml.

A package installed by hand on one machine hides a missing declaration until a fresh machine (a
user's, or CI's next one) fails at import time. This check reads the imports of every .py file
(the library, the stage scripts, data/, scripts/, bench/, tests/) with `ast`, drops the standard
library and the project's own modules, and asks that each remaining top-level module belong to a
distribution named in `dependencies` or in an extra. A module guarded by `pytest.importorskip`
must be declared too, in an extra, so the skip can name what to install.
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI and the project's machines have it

REPO = Path(__file__).resolve().parents[1]
SKIP_FOLDERS = {".git", "out", "runs", "build", "node_modules", "__pycache__"}

# Import names whose distribution has another name, for distributions that may not be installed
# (an optional extra): once installed, importlib.metadata knows the mapping by itself.
DISTRIBUTION_OF = {"llama_cpp": "llama-cpp-python", "yaml": "pyyaml", "PIL": "pillow", "sklearn": "scikit-learn",
                   "google": "protobuf", "jinja2": "jinja2"}


def normalise(name: str) -> str:
    """PEP 503 names: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions(pyproject: Path) -> set[str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {normalise(re.split(r"[<>=!~\[;@ ]", r.strip(), maxsplit=1)[0]) for r in requirements}


def python_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.py")
            if not any(part in SKIP_FOLDERS or part.startswith(".venv") for part in p.relative_to(root).parts)]


def own_modules(root: Path, project_name: str) -> set[str]:
    """Names a file here can import that are the project's own: top-level folders and scripts, and the
    helper modules beside the tests (pytest puts the tests folder on the path)."""
    return ({p.name for p in root.iterdir() if p.is_dir()} | {p.stem for p in root.glob("*.py")}
            | {p.stem for p in root.glob("tests/**/*.py")} | {project_name})


def imported_top_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import in the file, and of every pytest.importorskip."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()  # slow (reads every installed package): once


def distributions_of(module: str) -> set[str]:
    installed = installed_distributions().get(module, [])
    return {normalise(d) for d in installed} | {normalise(DISTRIBUTION_OF.get(module, module))}


def undeclared_imports(root: Path) -> dict[str, list[str]]:
    """{module: [files importing it]} for third-party modules no declared distribution provides."""
    pyproject = root / "pyproject.toml"
    declared = declared_distributions(pyproject)
    project_name = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["name"]
    ours = own_modules(root, project_name)
    missing: dict[str, list[str]] = {}
    for path in python_files(root):
        for module in imported_top_modules(path):
            if module in sys.stdlib_module_names or module in ours or module == "__future__":
                continue
            if not distributions_of(module) & declared:
                missing.setdefault(module, []).append(str(path.relative_to(root)))
    return missing


def test_every_third_party_import_is_declared_in_pyproject():
    missing = undeclared_imports(REPO)
    assert not missing, "imported but not declared in pyproject.toml (add to dependencies or an extra): " + "; ".join(
        f"{module} in {', '.join(sorted(files)[:3])}" for module, files in sorted(missing.items()))


def test_the_check_finds_an_undeclared_import_and_an_undeclared_importorskip(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "demo"\ndependencies = ["numpy>=1.0"]\n'
                                             '[project.optional-dependencies]\nllama = ["llama-cpp-python"]\n')
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "core.py").write_text("import os\nimport numpy as np\nfrom demo import core\n"
                                               "import yaml\nimport llama_cpp\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "helpers.py").write_text("X = 1\n")
    (tmp_path / "tests" / "test_demo.py").write_text("import pytest\nimport helpers\n"
                                                      "selenium = pytest.importorskip('selenium.webdriver')\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "site.py").write_text("import anything_installed_here\n")
    missing = undeclared_imports(tmp_path)
    assert set(missing) == {"yaml", "pytest", "selenium"}
    assert missing["yaml"] == ["demo/core.py"]


# ---- the README's two commands choose their Python (scripts/python_env.sh) ---------------------------------
def chosen_python(folder: Path, python: str) -> str:
    shutil.copy(REPO / "scripts" / "python_env.sh", folder)
    result = subprocess.run(["bash", "-c", "source python_env.sh && echo \"PY=$PY\""], cwd=folder, text=True,
                            capture_output=True, env={**os.environ, "PYTHON": python}, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].removeprefix("PY=")


def test_inside_an_environment_its_python_is_used_as_it_is(tmp_path):
    if sys.prefix == sys.base_prefix:
        pytest.skip("the tests run outside a virtual environment")
    assert chosen_python(tmp_path, sys.executable) == sys.executable
    assert not (tmp_path / ".venv").exists()


def test_outside_an_environment_a_dot_venv_is_made_once_and_used(tmp_path):
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.is_file() or (Path(sys.base_prefix) / "conda-meta").is_dir():
        pytest.skip(f"no interpreter outside an environment at {base}")
    assert chosen_python(tmp_path, str(base)) == str(tmp_path / ".venv" / "bin" / "python")
    assert (tmp_path / ".venv" / "bin" / "python").is_file()
    marker = tmp_path / ".venv" / "made-before"
    marker.write_text("")
    assert chosen_python(tmp_path, str(base)) == str(tmp_path / ".venv" / "bin" / "python")
    assert marker.exists()  # the second call reuses it
