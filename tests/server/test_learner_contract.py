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


def test_a_snapshot_with_prior_heads_serves_its_mixture_and_old_forms_still_load(
        tmp_path: Path) -> None:
    """The prior heads' per-request mixture leaves encoder.onnx and enters every decoder
    step; a snapshot without prior heads (the earlier form) loads and serves after it, and
    a snapshot with the mixture in one graph only is refused at load with the reason."""
    export = pytest.importorskip("learner.export")
    synthetic = pytest.importorskip("learner.synthetic")
    pretrain_mod = pytest.importorskip("learner.pretrain")
    import shutil

    import numpy as np

    from server.runtime import ModelRuntime
    from snapshot_format import PRIOR_LOG_MIX
    from tests.learner.conftest import small_settings

    log = synthetic.generate(n_ads=120, n_users=60, n_requests=1500, n_categories=6, seed=1)
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in log.ads)
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1,
                       warmup_widths=[16])
    outs = {}
    for version, kw in (("v000001", {"prior_heads": 2}), ("v000002", {})):
        res = pretrain_mod.pretrain(small_settings(tmp_path / version, steps=30, **kw),
                                    log.ads, log.feedback)
        out = outs[version] = tmp_path / "store" / version
        export.export_run(res.run_dir, out, version, parent=None)
        update = ModelUpdate(model_name="adloop", version=version, parent=None,
                             sha256=sha256_hex((out / "manifest.json").read_bytes()),
                             uri=out.as_uri(), id_space_version="", data_watermark=0.0,
                             created_time=0.0)
        assert mgr.apply_update(update) == "ok", mgr.describe()
        state = mgr.state
        assert state is not None and state.model.runtime.prior == bool(kw)
        ads = [a.ad_id for a in log.ads]
        (served,) = Engine(mgr, catalog).run([RecRequest("u1", {"device": "ios"}, ads[:5], 10)],
                                             lambda levels, k: [16] * levels)
        assert served.model_version == version and len(served.ads) == 10
        if kw:   # the step really reads the per-request mixture the encoder gave
            rt = state.model.runtime
            history, hmask, context = Engine(mgr, catalog).inputs(
                state, [RecRequest("u1", {}, ads[:5], 10), RecRequest("u2", {}, ads[9:], 10)])
            states = rt.encode(history, hmask, context)
            assert states.prior_log_mix is not None and states.prior_log_mix.shape == (2, 4)
            assert np.allclose(np.exp(states.prior_log_mix).sum(-1), 1.0, atol=1e-5)
            req, prefix = np.array([0, 1, 0], np.int64), np.zeros((3, 1), np.int64)
            base = rt.step(states, req, prefix)
            other = states._replace(prior_log_mix=np.log(np.full((2, 4), 0.25, np.float32)))
            assert np.abs(rt.step(other, req, prefix) - base).max() > 1e-6
    mixed = tmp_path / "mixed"
    shutil.copytree(outs["v000002"], mixed)
    shutil.copy(outs["v000001"] / "encoder.onnx", mixed / "encoder.onnx")
    with pytest.raises(ValueError, match=PRIOR_LOG_MIX):
        ModelRuntime(mixed, resolve_provider("cpu"), 1)
