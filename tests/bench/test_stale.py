"""Benchmark results record the code they were measured on, and ``bench/stale.py`` says
which no longer match it: the code hash, the provenance stamp, the checker's verdicts and
exit status, and every benchmark's dependency declaration."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from bench import codehash
from bench.codehash import TreeState, code_hash, combine
from bench.common import provenance

ROOT = Path(__file__).resolve().parents[2]
STALE = ROOT / "bench" / "stale.py"
PLUMBING = {"bench/__init__.py", "bench/common.py", "bench/codehash.py"}
"""Imported by every benchmark, but writing results shapes no figure (bench/common.py's
closed-loop settings are in the closed-loop declarations)."""


def write(root: Path, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=bench", "-c",
                           "user.email=bench@example.com", "-c", "commit.gpgsign=false", *args],
                          check=True, capture_output=True, text=True).stdout


def repo(root: Path, files: Mapping[str, str | bytes]) -> Path:
    write(root, files)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "start")
    return root


def commit_change(root: Path, rel: str, content: str) -> None:
    write(root, {rel: content})
    git(root, "commit", "-q", "-am", f"change {rel}")


TREE = {"traffic/world.py": "WORLD = 1\n", "traffic/__init__.py": "",
        "learner/model.py": "MODEL = 1\n", "other/tool.py": "TOOL = 1\n"}


def run_stale(root: Path, results: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # -S -E: no site-packages, no PYTHONPATH — the checker needs nothing but the stdlib.
    return subprocess.run([sys.executable, "-S", "-E", str(STALE), "--root", str(root),
                           "--results-dir", str(results), *extra],
                          capture_output=True, text=True, timeout=60)


def states(root: Path, results: Path) -> tuple[int, dict[str, dict[str, Any]]]:
    done = run_stale(root, results, "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, {v["result"]: v for v in json.loads(done.stdout)["results"]}


def stamp_result(results: Path, name: str, state: TreeState, specs: list[str],
                 **extra: Any) -> None:
    results.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "measured_at": "2026-01-01T00:00:00Z", **state.stamp(specs),
            **extra}
    (results / f"{name}.json").write_text(json.dumps(body))


# -- the hash -----------------------------------------------------------------------------


def test_hash_ignores_order_and_files_outside_the_dependencies(tmp_path: Path) -> None:
    write(tmp_path, TREE)
    before = code_hash(tmp_path, ["traffic/", "learner/model.py"])
    assert code_hash(tmp_path, ["learner/model.py", "traffic/"]) == before
    assert combine({"b": "2", "a": "1"}) == combine({"a": "1", "b": "2"})
    write(tmp_path, {"other/tool.py": "TOOL = 2\n",
                     "traffic/__pycache__/world.cpython-311.pyc": b"\0bytecode",
                     "traffic/stray.pyc": b"\0",
                     "bench/results/closed_loop.json": "{}",
                     "traffic/README.md": "# notes\n"})
    assert code_hash(tmp_path, ["traffic/", "learner/model.py", "bench/"]) == \
        code_hash(tmp_path, ["traffic/", "learner/model.py"]) == before


def test_hash_changes_when_a_dependency_changes_and_not_with_line_endings(
        tmp_path: Path) -> None:
    write(tmp_path, TREE)
    specs = ["traffic/"]
    before = code_hash(tmp_path, specs)
    write(tmp_path, {"traffic/world.py": "WORLD = 1\r\n"})
    assert code_hash(tmp_path, specs) == before
    write(tmp_path, {"traffic/world.py": "WORLD = 2\n"})
    changed = code_hash(tmp_path, specs)
    assert changed != before
    write(tmp_path, {"traffic/driver.py": "DRIVER = 1\n"})
    assert code_hash(tmp_path, specs) not in (before, changed)


def test_hash_is_the_same_from_git_and_from_a_plain_copy(tmp_path: Path) -> None:
    checkout = repo(tmp_path / "checkout", TREE)
    write(checkout, {"traffic/untracked_scratch.py": "x = 1\n"})
    copy = tmp_path / "copy"
    shutil.copytree(checkout, copy, ignore=shutil.ignore_patterns(".git", "untracked_*"))
    specs = ["traffic/", "learner/*.py"]
    assert code_hash(checkout, specs) == code_hash(copy, specs)
    assert "traffic/untracked_scratch.py" not in codehash.source_files(checkout)


def test_specs_name_directories_files_and_globs() -> None:
    assert codehash.matches("traffic/world.py", "traffic/")
    assert codehash.matches("traffic/world.py", "traffic")
    assert not codehash.matches("traffic_extra/x.py", "traffic")
    assert codehash.matches("bench/closed_loop.py", "bench/*.py")
    assert codehash.matches("adloop/evaluation.py", "adloop/evaluation.py")
    assert not codehash.matches("adloop/evaluation.pyi", "adloop/evaluation.py")
    assert not codehash.matches("learner/README.md", "learner/")
    assert codehash.matches("learner/README.md", "learner/README.md")


# -- the stamp ----------------------------------------------------------------------------


def test_stamp_names_the_commit_and_whether_the_measured_files_were_dirty(
        tmp_path: Path) -> None:
    root = repo(tmp_path, TREE)
    head = git(root, "rev-parse", "HEAD").strip()
    write(root, {"other/tool.py": "TOOL = 2\n"})
    state = TreeState.capture(root)
    clean = state.stamp(["traffic/"])
    assert clean["commit"] == head and clean["dirty"] is False
    assert clean["code_paths"] == ["traffic/"]
    assert clean["code_hash"] == code_hash(root, ["traffic/"])
    assert state.stamp(["other/"])["dirty"] is True


def test_files_edited_during_a_run_are_named_and_make_the_result_stale(
        tmp_path: Path) -> None:
    root = repo(tmp_path / "src", TREE)
    state = TreeState.capture(root)
    write(root, {"traffic/world.py": "WORLD = 2\n"})
    results = tmp_path / "results"
    stamp_result(results, "closed_loop", state, ["traffic/"])
    assert json.loads((results / "closed_loop.json").read_text())["changed_during_run"] == \
        ["traffic/world.py"]
    write(root, {"traffic/world.py": "WORLD = 1\n"})  # back as the run started
    rc, got = states(root, results)
    assert rc == 1 and got["closed_loop"]["state"] == "stale"
    assert "changed while it ran" in got["closed_loop"]["reason"]


def test_merging_into_results_of_other_code_records_the_mix(tmp_path: Path) -> None:
    root = repo(tmp_path / "src", TREE)
    state = TreeState.capture(root)
    now = provenance(["traffic/"], tree=state)
    same = provenance(["traffic/"], merged_from={**now, "measured_at": "x"}, tree=state)
    assert "mixed_with" not in same
    old = {"commit": "0" * 40, "code_hash": "other", "measured_at": "2026-01-01T00:00:00Z"}
    mixed = provenance(["traffic/"], merged_from=old, tree=state)
    assert mixed["mixed_with"] == [old]
    unstamped = provenance(["traffic/"], merged_from={"figures": 1}, tree=state)
    assert unstamped["mixed_with"] == [{"commit": None, "code_hash": None,
                                        "measured_at": None}]
    results = tmp_path / "results"
    results.mkdir()
    (results / "organic.json").write_text(json.dumps({"benchmark": "organic", **mixed}))
    rc, got = states(root, results)
    assert rc == 1 and got["organic"]["state"] == "stale"


# -- the checker --------------------------------------------------------------------------


def test_checker_exit_status_follows_the_headline_results(tmp_path: Path) -> None:
    root = repo(tmp_path / "src", TREE)
    results = tmp_path / "results"
    state = TreeState.capture(root)
    stamp_result(results, "closed_loop", state, ["traffic/", "learner/model.py"])
    stamp_result(results, "serve", state, ["other/"])
    rc, got = states(root, results)
    assert rc == 0
    assert {k: v["state"] for k, v in got.items()} == {"closed_loop": "fresh", "serve": "fresh"}

    commit_change(root, "other/tool.py", "TOOL = 2\n")
    rc, got = states(root, results)
    assert rc == 0, "a stale non-headline result only shows in the table"
    assert got["serve"]["state"] == "stale" and got["serve"]["changed"] == ["other/tool.py"]

    commit_change(root, "traffic/world.py", "WORLD = 2\n")
    rc, got = states(root, results)
    assert rc == 1
    assert got["closed_loop"]["state"] == "stale"
    assert got["closed_loop"]["changed"] == ["traffic/world.py"]
    table = run_stale(root, results)
    assert table.returncode == 1
    assert "closed_loop" in table.stdout and "traffic/world.py" in table.stdout


def test_checker_calls_unstamped_headline_results_unknown(tmp_path: Path) -> None:
    root = repo(tmp_path / "src", TREE)
    results = tmp_path / "results"
    results.mkdir()
    (results / "join.json").write_text(json.dumps({"benchmark": "join"}))
    rc, got = states(root, results)
    assert rc == 0 and got["join"]["state"] == "unknown"
    for name in ("demo", "ablations_gpr_more_seeds", "rspo_ablations"):
        (results / f"{name}.json").write_text(json.dumps({"benchmark": name}))
        rc, got = states(root, results)
        assert rc == 1 and got[name]["state"] == "unknown"
        (results / f"{name}.json").unlink()


def test_checker_without_the_commit_still_says_stale(tmp_path: Path) -> None:
    root = repo(tmp_path / "src", TREE)
    results = tmp_path / "results"
    stamp_result(results, "demo", TreeState.capture(root), ["traffic/"])
    body = json.loads((results / "demo.json").read_text())
    (results / "demo.json").write_text(json.dumps({**body, "commit": "f" * 40}))
    commit_change(root, "traffic/world.py", "WORLD = 2\n")
    rc, got = states(root, results)
    assert rc == 1 and got["demo"]["state"] == "stale" and got["demo"]["changed"] is None
    assert "unknown here" in got["demo"]["reason"]


# -- the declarations ---------------------------------------------------------------------


def import_closure(script: str) -> set[str]:
    """The repository files ``script`` can execute (bench/codehash.py's static import
    closure), without the results plumbing every benchmark imports."""
    return set(codehash.import_closure(ROOT, [script], opaque=frozenset(PLUMBING))) - PLUMBING


def declared(path: str) -> tuple[str, ...]:
    """The ``DEPENDS`` of the benchmark script ``path`` (a tuple it declares, or the one
    ``bench.common.in_process_depends`` computes from its imports)."""
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    depends = module.DEPENDS
    assert isinstance(depends, tuple) and all(isinstance(d, str) for d in depends), path
    return depends


WRITERS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*.py")
                 if p.name not in ("common.py", "ablation.py")  # given their DEPENDS
                 and ("write_results(" in p.read_text() or "depends=DEPENDS" in p.read_text()))


def test_every_results_writer_is_found() -> None:
    assert {"bench/closed_loop.py", "bench/demo.py", "bench/organic.py",
            "bench/ablations_gpr.py", "bench/decode.py"} <= set(WRITERS)


@pytest.mark.parametrize("script", WRITERS)
def test_benchmark_declares_the_code_it_imports(script: str) -> None:
    depends = declared(script)
    files = codehash.source_files(ROOT)
    empty = [s for s in depends if not codehash.select(files, [s])]
    assert not empty, f"{script}: DEPENDS entries naming no tracked file (git add?): {empty}"
    assert script in codehash.select(files, depends), f"{script} depends on itself"
    missing = sorted(import_closure(script) - set(codehash.select(files, depends)))
    assert not missing, f"{script} imports code its DEPENDS leaves out: {missing}"


def test_closed_loop_results_depend_on_the_world_harness_and_models() -> None:
    files = codehash.select(codehash.source_files(ROOT), declared("bench/closed_loop.py"))
    for required in ("traffic/world.py", "adloop/evaluation.py", "adloop/policies.py",
                     "adloop/baselines.py", "learner/model.py", "learner/rspo.py",
                     "server/engine.py", "streams/schemas.py", "bench/closed_loop.py",
                     "bench/common.py", "requirements.lock"):
        assert required in files


def test_in_process_results_leave_out_code_the_harness_never_imports() -> None:
    """The HTTP service and the live learner run only in the whole stack: editing them
    leaves the closed-loop figures fresh."""
    files = set(declared("bench/closed_loop.py"))
    assert not files & {"server/service.py", "server/app.py", "learner/online.py",
                        "streams/joiner.py", "adloop/demo.py"}


def test_import_closure_follows_lazy_and_relative_imports_and_stops_at_opaque_files(
        tmp_path: Path) -> None:
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from . import b\n    import pkg.sub.c\n",
        "pkg/b.py": "import json\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from ..plumbing import x\n",
        "pkg/plumbing.py": "import pkg.never\n",
        "pkg/never.py": "",
        "pkg/unused.py": "",
    })
    got = codehash.import_closure(tmp_path, ["pkg/a.py"], opaque=frozenset({"pkg/plumbing.py"}))
    assert got == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/plumbing.py",
                   "pkg/sub/__init__.py", "pkg/sub/c.py"]
