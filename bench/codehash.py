"""Which code a benchmark result was measured on: a content hash of its source files.

Standard library only: ``bench/common.py`` stamps every results file with it and
``bench/stale.py`` (which runs without the project's environment) checks the stamps.

A benchmark declares the files its figures depend on as ``code_paths``: a directory
(``"traffic/"``), a file (``"adloop/evaluation.py"``) or a glob (``"bench/*.py"``;
``*`` crosses ``/``), relative to the repository root; directories and globs leave out
documentation (``*.md``) and pictures. The files are the git-tracked ones
(``git ls-files``; a walk of the tree where git or the repository is missing), without
``__pycache__``, ``*.pyc`` and ``bench/results/``. The hash is sha256 over the sorted
``(path, sha256 of content)`` pairs, content with CRLF read as LF, so it is the same on
every checkout of the same code: no mtimes, no absolute paths.
"""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOC_SUFFIXES = (".md", ".png", ".svg", ".jpg")
"""Documentation and pictures: a directory or glob spec leaves them out (a file spec may
still name one), so editing a README leaves results fresh."""
EXCLUDED_DIRS = frozenset({"__pycache__", ".git", ".mypy_cache", ".ruff_cache",
                           ".pytest_cache", "node_modules"})
RESULTS_DIR = "bench/results/"


def _git(root: Path, *args: str) -> str | None:
    """``git ARGS`` in ``root``: its stdout, or None where git or the repository is missing
    or the command fails."""
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                              text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def excluded(path: str) -> bool:
    """Never part of a code hash: caches, bytecode, the results themselves."""
    parts = path.split("/")
    return (path.startswith(RESULTS_DIR) or path.endswith(".pyc")
            or any(p in EXCLUDED_DIRS or p.endswith(".egg-info") for p in parts[:-1]))


def is_git_root(root: Path) -> bool:
    """Whether ``root`` is the top of a git work tree (git answers for it)."""
    return _git(root, "rev-parse", "--show-prefix") == "\n"


def source_files(root: Path) -> list[str]:
    """Repository-relative POSIX paths of the source files under ``root``: the git-tracked
    ones that exist, or every file of the tree where git cannot tell."""
    listed = _git(root, "ls-files", "-z") if is_git_root(root) else None
    if listed is not None:
        paths = [p for p in listed.split("\0") if p]
        return sorted(p for p in paths if not excluded(p) and (root / p).is_file())
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in EXCLUDED_DIRS and not d.endswith(".egg-info"))
        rel = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            path = name if rel == "." else f"{rel}/{name}"
            if not excluded(path):
                found.append(path)
    return sorted(found)


def matches(path: str, spec: str) -> bool:
    """Whether ``path`` is one of the files ``spec`` (directory, file or glob) names."""
    spec = spec.strip().removeprefix("./")
    if path == spec:
        return True
    if path.endswith(DOC_SUFFIXES):
        return False
    if any(c in spec for c in "*?["):
        return fnmatch.fnmatchcase(path, spec)
    if spec.endswith("/"):
        return path.startswith(spec)
    return path.startswith(spec + "/")


def select(paths: Iterable[str], specs: Sequence[str]) -> list[str]:
    """The paths some spec names, sorted."""
    return sorted(p for p in paths if any(matches(p, s) for s in specs))


def module_file(root: Path, name: str) -> str | None:
    """The repository file of module ``name`` (``a/b.py`` or ``a/b/__init__.py``), or None
    for a module outside the repository (the standard library, an installed package)."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def imported_files(root: Path, path: str) -> set[str]:
    """The repository files the Python file ``path`` imports anywhere in it: module level
    and inside functions (a lazy import counts), with the packages on the way."""
    package = path.rsplit("/", 1)[0].replace("/", ".") if "/" in path else ""
    found: set[str] = set()
    for node in ast.walk(ast.parse((root / path).read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            found.update(f for i in range(1, len(parts) + 1)
                         if (f := module_file(root, ".".join(parts[:i]))))
    return found


def import_closure(root: Path, entries: Sequence[str],
                   opaque: frozenset[str] = frozenset()) -> list[str]:
    """Every repository Python file that running ``entries`` can execute: the files they
    import, what those import, and so on (static: nothing runs; every import statement
    counts, lazy ones too). A file in ``opaque`` is included when reached, but what it
    imports is not followed (benchmark plumbing that imports everything)."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path not in opaque:
            todo.extend(imported_files(root, path) - seen)
    return sorted(seen)


def file_digest(root: Path, path: str) -> str:
    """sha256 of a file's content, CRLF read as LF."""
    return hashlib.sha256((root / path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def combine(digests: Mapping[str, str]) -> str:
    """The code hash of files given as ``{path: file_digest}``: order-free."""
    h = hashlib.sha256()
    for path in sorted(digests):
        h.update(f"{path}\0{digests[path]}\n".encode())
    return h.hexdigest()


def code_hash(root: Path, specs: Sequence[str]) -> str:
    """The code hash of the source files ``specs`` names, as they are now under ``root``."""
    return combine({p: file_digest(root, p) for p in select(source_files(root), specs)})


def git_head(root: Path) -> str | None:
    """The commit checked out at ``root`` (None without git)."""
    out = _git(root, "rev-parse", "--verify", "HEAD") if is_git_root(root) else None
    return out.strip() if out else None


def git_uncommitted(root: Path) -> set[str] | None:
    """Paths with uncommitted changes (staged, unstaged or untracked; None without git)."""
    out = (_git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
           if is_git_root(root) else None)
    if out is None:
        return None
    paths: set[str] = set()
    entries = out.split("\0")
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        paths.add(entry[3:])
        if entry[0] in "RC":  # a rename or copy: the next entry is the old path
            paths.add(entries[i])
            i += 1
    return {p for p in paths if not excluded(p)}


def has_commit(root: Path, commit: str) -> bool:
    return _git(root, "cat-file", "-e", f"{commit}^{{commit}}") is not None


def changed_since(root: Path, commit: str, specs: Sequence[str]) -> list[str] | None:
    """The files ``specs`` names that differ between ``commit`` and the working tree
    (None where git does not have the commit)."""
    if not is_git_root(root) or not has_commit(root, commit):
        return None
    out = _git(root, "diff", "--name-only", "--no-renames", commit, "--", *specs)
    if out is None:
        return None
    return sorted(p for p in out.splitlines() if p and not excluded(p)
                  and any(matches(p, s) for s in specs))


@dataclass
class TreeState:
    """The source tree as a benchmark process found it: HEAD, the uncommitted paths and
    every source file's digest. Captured when the process starts, so that a result names
    the code the run loaded and files edited while it ran are caught at the end."""

    root: Path
    commit: str | None
    uncommitted: set[str] | None
    digests: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(cls, root: Path) -> TreeState:
        files = source_files(root)
        return cls(root=root, commit=git_head(root), uncommitted=git_uncommitted(root),
                   digests={p: file_digest(root, p) for p in files})

    def stamp(self, specs: Sequence[str]) -> dict[str, Any]:
        """The provenance fields of a results file depending on ``specs``: ``commit``,
        ``dirty`` (None without git), ``code_hash``, ``code_paths``, and
        ``changed_during_run`` when some of those files differ now from the start."""
        specs = list(specs)
        files = select(self.digests, specs)
        now = {p: file_digest(self.root, p) for p in select(source_files(self.root), specs)}
        changed = sorted(p for p in set(files) | set(now)
                         if self.digests.get(p) != now.get(p))
        dirty = (None if self.uncommitted is None
                 else any(matches(p, s) for p in self.uncommitted for s in specs))
        out: dict[str, Any] = {
            "commit": self.commit, "dirty": dirty,
            "code_hash": combine({p: self.digests[p] for p in files}), "code_paths": specs}
        if changed:
            out["changed_during_run"] = changed
        return out
