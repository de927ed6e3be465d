"""Ranking-side ablations in closed loop: OneRanker's and "Don't Waste It"'s mechanisms.

    python bench/ablations_ranking.py [--quick] [--seeds 0,...,7] [--variants a,b]

Every variant runs the ``rspo`` policy on the same seeds and the same simulated traffic
as ``bench/closed_loop.py`` (the world, logging phase and pretraining data of a seed are
identical for every variant); only the model and its losses change:

* ``base``: today's default model;
* ``+task_tokens``: [T_interest, T_value] after the user sequence (``task_tokens``);
* ``+fake_items``: one Fake Item Token per level-0 code (``fake_items``);
* ``+ranking_decoder``: the ranker reads the generator's cached keys/values
  (``ranker_kv``, KV pass-through);
* ``+dc``: the Distribution Consistency loss in pretraining and online (``dc_weight``;
  online over the logged final beams);
* ``+prior_heads``: hierarchical prior-conditioned heads (interaction type × horizon),
  mixed by the predicted prior distribution;
* ``all``: every mechanism above.

Per variant (bench/ablation.py): ``rpm_ratio`` to ``base`` with its 95 % interval, the
pretrained model's held-out ``recall_at_10`` and ``vndcg_at_10``, the slates'
``diversity`` (distinct categories per slate) and ``coverage`` (share of the catalogue
shown), ``decode_latency_ratio`` (serving wall time per request over ``base``'s).
Writes ``bench/results/ablations_ranking.json``, ``docs/ablations_ranking.png`` and the
``ablations_ranking`` section of docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ablation import Columns, main
from bench.common import in_process_depends

DEPENDS = in_process_depends("bench/ablations_ranking.py")

PRIOR_HEADS: dict[str, Any] = {"prior_heads": 2, "prior_horizons": 2}
DC = 0.5


def variants() -> dict[str, dict[str, Any]]:
    """Name -> EvalConfig overrides (``pretrain``: PretrainSettings, ``rspo``: RSPOConfig)."""
    every = {"task_tokens": True, "fake_items": True, "ranker_kv": True, "dc_weight": DC,
             **PRIOR_HEADS}
    return {
        "base": {},
        "+task_tokens": {"pretrain": {"task_tokens": True}},
        "+fake_items": {"pretrain": {"fake_items": True}},
        "+ranking_decoder": {"pretrain": {"ranker_kv": True}},
        "+dc": {"pretrain": {"dc_weight": DC}, "rspo": {"dc_weight": DC}},
        "+prior_heads": {"pretrain": dict(PRIOR_HEADS)},
        "all": {"pretrain": every, "rspo": {"dc_weight": DC}},
    }


COLUMNS: Columns = [
    ("recall_at_10", "recall@10", lambda r: r["offline_recall_at_10"]),
    ("vndcg_at_10", "vNDCG@10", lambda r: r["offline_vndcg_at_10"]),
    ("diversity", "diversity", lambda r: r["slate_diversity"]),
    ("sid_diversity", "SID diversity", lambda r: r["sid_diversity"]),
    ("coverage", "coverage", lambda r: r["catalogue_coverage"]),
    ("personalization", "personalization", lambda r: r["personalization"]),
]

if __name__ == "__main__":
    sys.exit(main("ablations_ranking", __doc__ or "", variants(), COLUMNS,
                  "Ranking-side ablations, closed loop",
                  "recall@10 and vNDCG@10 are the pretrained model's on held-out logged "
                  "requests; diversity is distinct categories per slate, coverage the share "
                  "of the catalogue shown.", depends=DEPENDS))
