"""The package layering of README.md's layout table, checked on every import statement
(module level or inside a function): a package imports only the packages below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("streams", "traffic", "learner", "server", "snapshot_format", "adloop")
ALLOWED: dict[str, set[str]] = {
    "streams": {"streams"},
    "snapshot_format": {"snapshot_format"},
    "traffic": {"traffic", "streams"},
    "learner": {"learner", "streams", "snapshot_format"},
    "server": {"server", "streams", "snapshot_format"},
    "adloop": set(PRODUCT),
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level adloop packages ``path`` imports, each with the first line doing so."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            if top in PRODUCT or top in {"tests", "bench", "deploy"}:
                found.setdefault(top, node.lineno)
    return found


def test_every_product_package_is_in_the_table() -> None:
    for package in PRODUCT:
        assert (ROOT / package / "__init__.py").is_file(), package
        assert package in ALLOWED


@pytest.mark.parametrize("package", PRODUCT)
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {top}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for top, line in imported_packages(path).items()
             if top not in ALLOWED[package]]
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])}: {wrong}"


def test_the_server_imports_no_torch() -> None:
    for path in sorted((ROOT / "server").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(m.split(".")[0] == "torch" for m in mods), path


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from learner import model\n    import server.app\n")
    assert imported_packages(src) == {"learner": 2, "server": 3}
