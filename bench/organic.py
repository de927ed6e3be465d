"""Mixed feeds in closed loop: what organic feedback does for the organic slots and the ads.

    python bench/organic.py [--quick] [--seeds 0,...,7] [--variants a,b]

Every variant runs the ``rspo`` policy on the same seeds and simulated traffic as
``bench/closed_loop.py``, with ``ORGANIC_SLOTS`` organic items (videos, articles) per
request next to the ads: the server places them with the same model, constrained to the
organic items' ids in the shared id space, and the simulated users view, like and dwell
on them (docs/traffic.md, Mixed feed). The variants:

* ``base``: engaged organic items of the logged mixed feeds are pretraining targets
  (``organic_targets``, the default); the online step does not train on organic
  feedback (``organic_weight`` 0);
* ``no_organic_targets``: pretraining on the ads only (online as base);
* ``+organic_term``: the online step's organic term (RSPO + VSL anchor over each feed's
  organic items, rewarded by likes and dwell; ``organic_weight`` 1, the default since
  this benchmark).

Per variant (bench/ablation.py): ``rpm_ratio`` to ``base`` (the ads' revenue) with its
95 % interval, and the organic slots' last-quarter true expected engagement per item
(P(view)·(1 + P(like | view))), its per-seed ratio to ``base``'s with its 95 %
interval, its ratio to the organic oracle's on the same requests, the realized view
and like rates. Writes ``bench/results/organic.json``,
``docs/organic.png`` and the ``organic`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ablation import Columns, main
from bench.common import in_process_depends

DEPENDS = in_process_depends("bench/organic.py")

ORGANIC_SLOTS = 3
MIXED = {"organic_slots": ORGANIC_SLOTS}


def variants() -> dict[str, dict[str, Any]]:
    """Name -> overrides (``eval``: EvalConfig, ``pretrain``: PretrainSettings, ``rspo``:
    RSPOConfig); every one serves mixed feeds."""
    return {
        "base": {"eval": MIXED, "rspo": {"organic_weight": 0.0}},
        "no_organic_targets": {"eval": MIXED, "pretrain": {"organic_targets": False},
                               "rspo": {"organic_weight": 0.0}},
        "+organic_term": {"eval": MIXED, "rspo": {"organic_weight": 1.0}},
    }


COLUMNS: Columns = [
    ("organic_engagement", "organic engagement / item",
     lambda r: r["organic_engagement_last_quarter"]),
    ("organic_engagement_ratio", "organic engagement ratio to base (95% CI)",
     lambda r: r.get("organic_engagement_ratio")),
    ("organic_oracle_ratio", "organic / organic oracle",
     lambda r: r["organic_oracle_ratio_last_quarter"]),
    ("organic_view_rate", "view rate", lambda r: r["organic_view_rate"]),
    ("organic_like_rate", "like rate", lambda r: r["organic_like_rate"]),
]

if __name__ == "__main__":
    sys.exit(main("organic", __doc__ or "", variants(), COLUMNS,
                  "Mixed feeds, closed loop",
                  f"{ORGANIC_SLOTS} organic items per request next to the ads. Organic "
                  "engagement is the last quarter's true expected engagement per organic "
                  "item, P(view)·(1 + P(like | view)), and its ratio to the organic "
                  "oracle's on the same requests; view and like rates are realized, over "
                  "the run.", depends=DEPENDS))
