"""What a benchmark that runs the loop as processes depends on (bench/common.py holds the
in-process harness's; kept apart so that adding here leaves those results fresh)."""

from __future__ import annotations

from collections.abc import Sequence

from bench.codehash import import_closure
from bench.common import LOCKFILE, PLUMBING, ROOT


def stack_depends(script: str, *commands: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """What the results of a benchmark that runs the loop as processes depend on: the
    import closure of ``script`` and of the modules behind each ``adloop`` command it
    starts as a process (``commands``: ``join``, ``learn``, ``serve``, ...; the CLI loads
    only the chosen command's module), the embedded broker's Maven descriptor, the lock
    file and ``extra``."""
    from adloop.cli import COMMANDS, register_optional

    register_optional()
    entries = [script, "adloop/__main__.py", "adloop/cli.py"]
    for name in commands:
        module = COMMANDS[name][0]
        entries.append(next(f for f in (module.replace(".", "/") + ".py",
                                        module.replace(".", "/") + "/__init__.py")
                            if (ROOT / f).is_file()))
    closure = import_closure(ROOT, entries, opaque=PLUMBING)
    keep = {p for p in closure if p not in PLUMBING}
    return tuple(sorted({*keep, "bench/common.py", "deploy/kafka/", LOCKFILE, *extra}))
