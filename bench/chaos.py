"""Every fault once during live traffic on the embedded stack, then account for every event.

See :mod:`adloop.chaos` for the faults and :mod:`adloop.reconcile` for the rules.
Prints the table (fault, events in, accounted, lost, doubled, dead-lettered, recovery
seconds), writes ``bench/results/chaos.json`` (``rows``: one per fault and load phase;
``load``: the 1x/2x/3x capacity table) and the tables of ``docs/reliability.md``.

    python bench/chaos.py [--quick] [--faults kill_joiner,malformed_burst] [--no-load]

Exit status 1 when anything was lost or doubled.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adloop.chaos import ChaosRun, configure, settings_of  # noqa: E402
from adloop.console import Console  # noqa: E402
from bench.common import STACK_DEPENDS, device, markdown_table, write_results  # noqa: E402

DEPENDS = (*STACK_DEPENDS, "bench/chaos.py")

DOC = ROOT / "docs" / "reliability.md"
COLUMNS = ["fault", "events_in", "accounted", "lost", "doubled", "dead_lettered", "recovery_s"]
LOAD_COLUMNS = ["load", "offered_per_s", "sent_per_s", "requests", "ok", "shed_429", "other",
                "server_p99_ms", "client_p50_ms", "client_p99_ms", "mean_beam_level0",
                "min_beam_scale", "lag_recovery_s"]


def fault_table(rows: list[dict[str, Any]]) -> str:
    extra = ["wrong", "organic_engagements", "untrained", "late_inside_window", "process_exits"]
    return markdown_table([*COLUMNS, *extra],
                          [[r[c] if r[c] is not None else "—" for c in COLUMNS]
                           + [r[c] for c in extra] for r in rows])


def load_table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(LOAD_COLUMNS, [[r[c] if r[c] is not None else "—"
                                          for c in LOAD_COLUMNS] for r in rows])


def update_reliability_doc(body: str) -> None:
    """Replace the generated block of docs/reliability.md."""
    begin, end = "<!-- chaos:begin -->", "<!-- chaos:end -->"
    text = DOC.read_text() if DOC.exists() else f"# Reliability\n\n{begin}\n{end}\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    configure(parser)
    parser.add_argument("--verbose", action="store_true",
                        help="log lines on the console (default: <out>/logs/chaos.log)")
    args = parser.parse_args(argv)
    s = settings_of(args)
    # SIGTERM unwinds like Ctrl-C, so the stack's processes and broker are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_path = Path(s.out) / "logs" / "chaos.log"
    with Console(log_path, args.verbose) as console:
        if console.quiet:
            console.say(f"logs: {log_path} and {Path(s.out)}/stack/logs/<process>.log "
                        f"(--verbose shows them here)")
        result = ChaosRun(s).run()
    rows = result["rows"]
    print(fault_table(rows))
    if result["load"]:
        print(load_table(result["load"]))
    results = {"quick": s.quick, "rows": rows, "load": result["load"],
               "capacity_per_s": result["capacity_per_s"],
               "exit_codes": result["exit_codes"], "exits": result["exits"],
               "device": device(),
               "settings": {"rate": s.rate, "speed": s.speed, "phase_s": s.phase_s,
                            "attribution_window_s": s.attribution_window_s,
                            "observation_window_s": s.observation_window_s}}
    path = write_results("chaos", results, DEPENDS)
    exits = ", ".join(f"{e['process']} in {e['phase']} (exit {e['exit_code']})"
                      for e in result["exits"]) or "none"
    total_lost = sum(r["lost"] + r["wrong"] for r in rows)
    total_doubled = sum(r["doubled"] for r in rows)
    body = (
        f"`bench/chaos.py{' --quick' if s.quick else ''}` on {device()}: open-loop traffic "
        f"at {s.rate:g} requests/s, simulated time x{s.speed:g}, attribution window "
        f"{s.attribution_window_s:g} simulated seconds; one fault per phase "
        f"({s.phase_s:g} s at least), then tail traffic until every window closed.\n\n"
        f"{fault_table(rows)}\n\n"
        f"Totals: lost {total_lost}, doubled {total_doubled}, dead-lettered "
        f"{sum(r['dead_lettered'] for r in rows)} of {sum(r['events_in'] for r in rows)} "
        f"events in. Processes that exited on their own (restarted by the runner's "
        f"supervisor, as compose's restart policy would): {exits}.")
    if result["load"]:
        body += (f"\n\nLoad (server capacity measured closed loop: "
                 f"{result['capacity_per_s']:g} requests/s at full beams):\n\n"
                 f"{load_table(result['load'])}")
    update_reliability_doc(body)
    print(f"wrote {path} and {DOC.relative_to(ROOT)}")
    return 1 if total_lost or total_doubled else 0


if __name__ == "__main__":
    sys.exit(main())
