"""End-to-end freshness on the embedded stack: feedback appended -> served by a snapshot.

Starts the broker, the learner and the server as real processes (the joiner is not
needed: the probe writes feedback lists directly). Each probe appends one feedback
list with a new, higher event time and measures the wall time until the server's
``adloop_server_snapshot_data_watermark_timestamp_seconds`` reaches it, i.e. until
requests are answered by a snapshot trained on that list.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from adloop.demo import metric_sum, scrape
from adloop.stack import LocalStack, free_port
from learner import synthetic
from learner.pretrain import PretrainSettings, pretrain
from streams.kafka_io import EventProducer


def measure_freshness(quick: bool = True) -> dict[str, float | int | None]:
    probes = 8 if quick else 25
    log = synthetic.generate(n_ads=120, n_users=80, n_requests=600, seed=5)
    with tempfile.TemporaryDirectory(prefix="adloop-fresh-") as tmp:
        root = Path(tmp)
        pretrain(PretrainSettings(run_dir=root / "pre", encoder="hashing", steps=30,
                                  level_sizes="16,8", history_len=10, batch_size=64,
                                  progress=False, checkpoint_every=0, resume=False),
                 log.ads, log.feedback)
        with LocalStack(root / "stack") as stack:
            producer = EventProducer(stack.kafka)
            for ad in log.ads:
                producer.send("ads", ad)
            producer.flush()
            lp, sp = free_port(), free_port()
            stack.add("learn", ["learn", *stack.kafka_args(), "--init-run-dir",
                                str(root / "pre"), "--state-dir", str(root / "learner"),
                                "--snapshot-store", str(root / "snapshots"),
                                "--metrics-port", str(lp), "--batch-lists", "8",
                                "--max-wait-s", "0.05", "--snapshot-every-updates", "1",
                                "--snapshot-every-s", "0.2", "--holdout-every", "0",
                                "--threads", "1"],
                      f"http://127.0.0.1:{lp}/readyz").start()
            stack.add("serve", ["serve", *stack.kafka_args(), "--port", str(sp),
                                "--cache-dir", str(root / "cache"),
                                "--snapshot-bases", str(root / "snapshots")],
                      f"http://127.0.0.1:{sp}/readyz").start()
            for p in stack.processes.values():
                p.wait_ready(300)
            samples: list[float] = []
            base = max(fb.event_time for fb in log.feedback) + 10.0
            for i in range(probes):
                fb = log.feedback[i]
                t_event = base + 100.0 * (i + 1)
                probe = type(fb)(**{**{f: getattr(fb, f) for f in fb.__struct_fields__},
                                    "request_id": f"fresh-{i}", "event_time": t_event})
                t0 = time.monotonic()
                producer.send("feedback", probe)
                producer.flush()
                deadline = t0 + 120
                while time.monotonic() < deadline:
                    wm = metric_sum(scrape(f"http://127.0.0.1:{sp}/metrics"),
                                    "adloop_server_snapshot_data_watermark_timestamp_seconds")
                    if wm >= t_event:
                        samples.append(time.monotonic() - t0)
                        break
                    time.sleep(0.05)
            producer.close()
    samples.sort()
    if not samples:
        return {"freshness_p50_s": None, "freshness_p95_s": None, "freshness_probes": 0}
    p95 = samples[min(len(samples) - 1, round(0.95 * (len(samples) - 1)))]
    return {"freshness_p50_s": round(statistics.median(samples), 3),
            "freshness_p95_s": round(p95, 3), "freshness_probes": len(samples),
            "freshness_probes_sent": probes}
