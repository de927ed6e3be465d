"""The console keeps to the run's own lines; logs (this process's and its children's) go
to a file, or stay on the terminal with verbose."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from adloop.console import Console
    from streams.logs import configure_logging, get_logger

    configure_logging()
    log = get_logger("demo")
    with Console(Path(sys.argv[1]), verbose=sys.argv[2] == "1") as console:
        console.say("(1/2) a step")
        log.info("structured.line", n=1)
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.stderr.write('child says hello\\\\n')"], check=True)
        console.progress("progress 50%")
        console.say("summary: done")
    log.info("after.close")
""")


def _run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "logs" / "demo.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(path), "1" if verbose else "0"],
                         capture_output=True, text=True, timeout=120, check=True)
    return res, path


def test_logs_of_the_process_and_its_children_go_to_the_file_and_steps_stay_on_stdout(
        tmp_path: Path) -> None:
    res, path = _run(tmp_path, verbose=False)
    assert res.stdout.splitlines() == ["(1/2) a step", "progress 50%", "summary: done"]
    logged = path.read_text()
    assert '"event": "structured.line"' in logged  # JSON in the file
    assert "child says hello" in logged              # a child's stderr too
    assert "structured.line" not in res.stderr and "child says hello" not in res.stderr
    assert "after.close" in res.stderr               # stderr is back after close


def test_verbose_leaves_every_log_line_on_the_terminal(tmp_path: Path) -> None:
    res, path = _run(tmp_path, verbose=True)
    assert "structured.line" in res.stderr and "child says hello" in res.stderr
    assert "(1/2) a step" in res.stdout
    assert not path.exists()
