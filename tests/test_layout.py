"""The shape of the code base, checked: lillm is a library with drivers at its edges.

- no import cycles inside lillm/ (imports inside functions count too);
- the library never imports a driver (a stage script, scripts/, data/, bench/), and no driver
  imports another driver (library code belongs in lillm/, where every driver can reach it);
- no code that edits the module search path, and no private name imported from another module;
- the README's design map names every module of lillm/.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = {p.stem for p in REPO.glob("*.py")}
DRIVER_PACKAGES = {"scripts", "data", "bench"}


def python_files() -> list[Path]:
    skip = {".git", ".venv", "out", "runs", "build"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def imported_modules(path: Path, package: str | None = None) -> list[tuple[str, list[str]]]:
    """(module, names) for every import statement in the file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            names = [alias.name for alias in node.names]
            if node.module is None:  # `from . import checkpoint`: the names are modules
                found += [(f"{module}.{name}", []) for name in names]
            else:
                found.append((module, names))
    return found


def lillm_graph() -> dict[str, set[str]]:
    graph = {}
    for path in (REPO / "lillm").glob("*.py"):
        name = f"lillm.{path.stem}" if path.stem != "__init__" else "lillm"
        graph[name] = {m for m, _ in imported_modules(path, "lillm.__init__") if m.startswith("lillm.")}
    return graph


def test_no_import_cycles_in_lillm():
    graph = lillm_graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def is_driver(module: str) -> bool:
    top = module.split(".")[0]
    return top in DRIVER_PACKAGES or top in STAGE_SCRIPTS


def test_the_library_never_imports_a_driver_and_drivers_do_not_import_each_other():
    offenders = []
    for path in python_files():
        rel = path.relative_to(REPO)
        if rel.parts[0] == "tests":
            continue  # tests may call a driver's main()
        own = rel.parts[0] if len(rel.parts) > 1 else None
        for module, _ in imported_modules(path, ".".join(rel.with_suffix("").parts)):
            if is_driver(module) and not (own == "bench" and module.split(".")[0] == "bench"):
                offenders.append(f"{rel} imports {module}")
    assert not offenders, offenders


def test_no_sys_path_manipulation_and_no_e402_escapes():
    needle_path, needle_noqa = "sys." + "path", "noqa: " + "E402"
    offenders = [str(p.relative_to(REPO)) for p in python_files()
                 if needle_path in p.read_text(encoding="utf-8") or needle_noqa in p.read_text(encoding="utf-8")]
    assert not offenders, offenders


def test_no_private_name_is_imported_from_another_module():
    offenders = []
    for path in python_files():
        rel = path.relative_to(REPO)
        for module, names in imported_modules(path, ".".join(rel.with_suffix("").parts)):
            offenders += [f"{rel}: {name} from {module}" for name in names
                          if name.startswith("_") and not name.startswith("__")]
    assert not offenders, offenders


def test_every_library_module_is_in_the_readmes_design_map():
    """The README's design map names every module of lillm/: a new module adds its row."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    design = readme[readme.index("## Design"):]
    missing = [path.name for path in sorted((REPO / "lillm").glob("*.py"))
               if path.stem != "__init__" and f"`lillm/{path.name}`" not in design]
    assert not missing, f"add a row to the README's design map for {missing}"
