"""RSPO ablations in closed loop: each change of docs/rspo.md added in turn.

    python bench/rspo_ablations.py [--quick] [--seeds 0,1,2] [--requests N]

Variants (every one on the same seeds and the same simulated traffic as
``bench/closed_loop.py``; ``frozen`` is the pretrained model with today's serving):

* ``base``: the earlier form: realized rewards, per-list gain scale, every rewarded item
  an anchor positive, a value head sharing the generator's item table and encoder
  gradients, level 0 capped at 16 beams, no exploration;
* ``+dense_rewards``: value-model rewards on one money scale, clicks/conversions as
  anchor positives;
* ``+value_separation``: the value head's own item table, RSPO does not move the encoder;
* ``+catalogue_beams``: the width at every level, level 0 whole for a small catalogue;
* ``+exploration``: the reserved exploration slot (5 % of requests);
* ``+trie_logprobs``: RSPO's log-probs renormalized over the servable trie, as the
  server scores a level;
* ``+value_priors``: the value head's empirical-Bayes priors per (industry, bid
  type/goal) from the logs (the default until the value head's linear terms were
  fitted to convergence; now off: the variant before it is the default, ``frozen``
  is that model).

The promotion guard (the fifth change) does not act inside the harness; its test is in
``tests/learner/test_online_learner.py``. Writes ``bench/results/rspo_ablations.json``
and the ``rspo_ablations`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from adloop.evaluation import EvalConfig, compare, mean_ci
from bench.common import (
    add_closed_loop_arguments,
    closed_loop_config,
    device,
    in_process_depends,
    markdown_table,
    update_doc_section,
    write_results,
)

DEPENDS = in_process_depends("bench/rspo_ablations.py")

OLD_RSPO: dict[str, Any] = {"reward": "realized", "money_scale": False,
                            "anchor_clicks_only": False, "generator_encoder_grad": True}
DENSE = {"reward": "value", "money_scale": True, "anchor_clicks_only": True}
SEPARATE = {"generator_encoder_grad": False}


def variants() -> list[tuple[str, dict[str, Any]]]:
    base: dict[str, Any] = {"rspo": OLD_RSPO, "value_own_items": False, "catalogue_beams": False,
                            "explore": 0.0, "trie_logprobs": False, "value_priors": False}
    dense = {**base, "rspo": {**OLD_RSPO, **DENSE}}
    separate = {**dense, "rspo": {**dense["rspo"], **SEPARATE}, "value_own_items": True}
    beams = {**separate, "catalogue_beams": True}
    explore = {**beams, "explore": 0.05}
    trie = {**explore, "trie_logprobs": True}
    priors = {**trie, "value_priors": True}
    return [("base", base), ("+dense_rewards", dense), ("+value_separation", separate),
            ("+catalogue_beams", beams), ("+exploration", explore), ("+trie_logprobs", trie),
            ("+value_priors", priors)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_closed_loop_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg: EvalConfig = closed_loop_config(args)
    t0 = time.perf_counter()
    per_seed: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="adloop-rspo-ablations-") as tmp:
        runs = [("frozen", dataclasses.replace(cfg, policies=("frozen",)))]
        runs += [(name, dataclasses.replace(cfg, policies=("rspo",), **over))
                 for name, over in variants()]
        for name, vcfg in runs:
            def progress(m: str, n: str = name) -> None:
                print(f"[{n}] {m}", flush=True)

            res = compare(vcfg, Path(tmp) / name.strip("+"), progress=progress,
                          jobs=args.jobs)
            entry = next(iter(res["policies"].values()))
            per_seed[name] = entry["per_seed_rpm_last_quarter"]
    elapsed = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []
    for name, rpm in per_seed.items():
        m, lo, hi = mean_ci(rpm)
        ratios = [a / b for a, b in zip(rpm, per_seed["frozen"], strict=True) if b]
        rm, rlo, rhi = mean_ci(ratios)
        rows.append({"name": name, "rpm_mean": round(m, 3), "rpm_ci95": [round(lo, 3),
                     round(hi, 3)], "per_seed_rpm": [round(x, 3) for x in rpm],
                     "rpm_ratio_to_frozen": round(rm, 4),
                     "rpm_ratio_to_frozen_ci95": [round(rlo, 4), round(rhi, 4)]})
    write_results("rspo_ablations", {
        "device": device(), "quick": args.quick, "seeds": list(cfg.seeds),
        "encoder": cfg.encoder, "command": " ".join(["bench/rspo_ablations.py", *sys.argv[1:]]),
        "requests_per_policy": cfg.requests, "elapsed_s": round(elapsed, 1),
        "metric": "expected revenue per mille impressions, last quarter of the run",
        "variants": rows}, DEPENDS)
    table = markdown_table(
        ["variant", "RPM last quarter (95% CI)", "per seed", "ratio to frozen (95% CI)"],
        [[r["name"], f"{r['rpm_mean']:.2f} ({r['rpm_ci95'][0]:.2f}–{r['rpm_ci95'][1]:.2f})",
          ", ".join(f"{x:.1f}" for x in r["per_seed_rpm"]),
          f"{r['rpm_ratio_to_frozen']:.3f} ({r['rpm_ratio_to_frozen_ci95'][0]:.3f}–"
          f"{r['rpm_ratio_to_frozen_ci95'][1]:.3f})"] for r in rows])
    update_doc_section("rspo_ablations", (
        f"`{' '.join(['bench/rspo_ablations.py', *sys.argv[1:]])}`: seeds "
        f"{list(cfg.seeds)}, {cfg.requests} requests per run, encoder {cfg.encoder}, "
        f"{device()}, {elapsed:.0f} s. "
        "Each row adds one change of [docs/rspo.md](rspo.md) to the one above; `frozen` "
        "is the pretrained model without updates. The promotion guard does not act in the "
        "harness (its test pins it).\n\n" + table))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
