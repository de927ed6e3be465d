"""The serving path in-process: learner export -> server model manager -> engine."""

from __future__ import annotations

from pathlib import Path

import msgspec
import torch

from adloop.inprocess import InProcessServer
from learner import synthetic
from learner.pretrain import pretrain
from server.engine import RecRequest
from tests.learner.conftest import small_settings


def test_new_ads_reach_serving_through_an_id_update_that_keeps_the_loaded_graphs(
        tmp_path: Path) -> None:
    log = synthetic.generate(n_ads=60, n_users=30, n_requests=400, n_categories=4, seed=3)
    res = pretrain(small_settings(tmp_path / "run", steps=20), log.ads, log.feedback)
    srv = InProcessServer(tmp_path / "serve", threads=1)
    srv.sync_catalog(log.ads)
    assert srv.publish(res.model, res.tokenizer) == "v000001"
    state = srv.manager.state
    assert state is not None
    before, runtime = srv.servable(), state.model.runtime

    fresh = msgspec.structs.replace(log.ads[0], ad_id="fresh-ad")
    srv.sync_catalog([fresh])
    assert srv.update_ids(res.tokenizer) is None          # not placed yet: nothing to do
    res.tokenizer.add_ads([fresh])
    assert srv.update_ids(res.tokenizer) == "v000002"
    state = srv.manager.state
    assert state is not None
    assert state.model.runtime is runtime                 # same graphs: sessions reused
    assert "fresh-ad" in state.model.row_of and srv.servable() == before + 1

    out = srv.rank([RecRequest("u1", {}, [], 5)], lambda levels, k: [512] * levels)
    assert out[0].candidates == srv.servable()            # beams wider than the catalogue
    assert out[0].model_version == "v000002" and len(out[0].ads) == 5

    with torch.no_grad():                                 # a learner publish: new graphs
        for p in res.model.parameters():
            p.add_(0.01)
    assert srv.publish(res.model, res.tokenizer) == "v000003"
    state = srv.manager.state
    assert state is not None and state.model.runtime is not runtime
    assert "fresh-ad" in state.model.row_of
    srv.close()
