"""The learner's real export (learner.export) loads and serves in the server unchanged.

The test process imports torch (to train and export); the server code does not.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from snapshot_format import sha256_hex
from streams.schemas import ModelUpdate


def test_a_learner_export_passes_every_check_and_serves(tmp_path: Path) -> None:
    export = pytest.importorskip("learner.export")
    synthetic = pytest.importorskip("learner.synthetic")
    pretrain_mod = pytest.importorskip("learner.pretrain")
    from tests.learner.conftest import small_settings

    log = synthetic.generate(n_ads=120, n_users=60, n_requests=1500, n_categories=6, seed=1)
    res = pretrain_mod.pretrain(small_settings(tmp_path / "run", mode="lazy_ar", steps=30),
                                log.ads, log.feedback)
    out = tmp_path / "store" / "v000001"
    export.export_run(res.run_dir, out, "v000001", parent=None)

    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in log.ads)
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 2, 1,
                       warmup_widths=[16])
    update = ModelUpdate(model_name="adloop", version="v000001", parent=None,
                         sha256=sha256_hex((out / "manifest.json").read_bytes()),
                         uri=out.as_uri(), id_space_version="", data_watermark=0.0,
                         created_time=0.0)
    assert mgr.apply_update(update) == "ok"
    ads = [a.ad_id for a in log.ads]
    (res_,) = Engine(mgr, catalog).run([RecRequest("u1", {"device": "ios"}, ads[:5], 10)],
                                       lambda levels, k: [16] * levels)
    assert res_.model_version == "v000001" and len(res_.ads) == 10
    assert {a.ad_id for a in res_.ads} <= set(ads)
