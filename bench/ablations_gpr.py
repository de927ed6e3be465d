"""GPR ablations in closed loop: organic history, the HHD intent decoder, MTP, HEPO, SIDs.

    python bench/ablations_gpr.py [--quick] [--seeds 0,...,7] [--variants a,b]

Every variant runs the ``rspo`` policy on the same seeds and the same simulated traffic
as ``bench/closed_loop.py``; only the settings named change from ``base`` (today's
defaults: organic topics in the user history, one decoder, MTP heads on the pooled
memory, RSPO without HEPO, RQ-Kmeans semantic ids):

* ``ads_only``: no organic history (``organic_len`` 0);
* ``+hhd``: GPR's intent decoder between the user encoder and the ad generator
  (``intent_tokens`` 4);
* ``mtp_none``: no multi-token prediction (``mtp_heads`` 0);
* ``mtp_decoder``: MTP through the decoder (each future id decoded teacher-forced by the
  decoder's blocks) instead of heads on the pooled memory;
* ``+hepo``: HEPO over the logged sibling beams alongside RSPO (``hepo_weight``);
* ``+sid_refine``: RQ-VAE-style refinement of the semantic-ID codebooks
  (``refine_steps``).

Per variant (bench/ablation.py): ``rpm_ratio`` to ``base`` with its 95 % interval, the
pretrained model's held-out ``recall_at_10``, ``ctcvr`` (CTR × CVR of the run's
impressions, means over seeds) and ``decode_latency_ratio``. Writes
``bench/results/ablations_gpr.json``, ``docs/ablations_gpr.png`` and the
``ablations_gpr`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ablation import Columns, main
from bench.common import in_process_depends

DEPENDS = in_process_depends("bench/ablations_gpr.py")

HEPO = 0.5


def variants() -> dict[str, dict[str, Any]]:
    """Name -> EvalConfig overrides (``pretrain``: PretrainSettings, ``rspo``: RSPOConfig)."""
    return {
        "base": {},
        "ads_only": {"pretrain": {"organic_len": 0}},
        "+hhd": {"pretrain": {"intent_tokens": 4}},
        "mtp_none": {"pretrain": {"mtp_heads": 0}},
        "mtp_decoder": {"pretrain": {"mtp_mode": "decoder"}},
        "+hepo": {"rspo": {"hepo_weight": HEPO}},
        "+sid_refine": {"pretrain": {"refine_steps": 200}},
    }


COLUMNS: Columns = [
    ("recall_at_10", "recall@10", lambda r: r["offline_recall_at_10"]),
    ("ctcvr", "CTCVR", lambda r: None if r.get("ctr") is None or r.get("cvr") is None
     else round(r["ctr"] * r["cvr"], 5)),
]

if __name__ == "__main__":
    sys.exit(main("ablations_gpr", __doc__ or "", variants(), COLUMNS,
                  "GPR ablations, closed loop",
                  "recall@10 is the pretrained model's on held-out logged requests; CTCVR is "
                  "CTR × CVR of the run's impressions.", depends=DEPENDS))
