"""A snapshot swap is not load: the batches it slows down neither narrow the beams nor
feed the service-time estimate, and nothing is refused (429) while it runs, except at
the queue bound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from server.api import LoopLag
from server.batcher import Batcher
from server.catalog import AdCatalog
from server.controller import BeamController
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from tests.server.conftest import AD_IDS, Builder
from tests.support.snapshots import make_ads


def _during_swap() -> float:
    return REGISTRY.get_sample_value("adloop_server_batches_during_swap_total") or 0.0


def _overloaded(c: BeamController) -> None:
    """Batches far over the SLO until the beams are at their narrowest."""
    for _ in range(20):
        c.observe(8, 0.04, 0.05, 64)
    assert c.at_floor


def test_batches_that_overlap_a_swap_do_not_move_the_controller() -> None:
    c = BeamController([16, 16, 8], slo_s=0.05, max_batch=8, hold_s=0.0)
    c.observe(8, 0.002, 0.0, 0)                       # a calm batch: 2 ms per batch
    service_s = c.backlog_s(0)
    before = _during_swap()

    started_before = c.swap_mark()                    # running when the swap starts
    with c.swapping():
        assert c.swap_in_progress
        during = c.swap_mark()                        # started while the swap runs
        c.observe(8, 0.5, 0.5, 200, started_before)   # 10x the SLO: the swap's slowdown
        c.observe(8, 0.5, 0.5, 200, during)
    c.observe(8, 0.5, 0.5, 200, during)               # ended after the swap
    assert not c.swap_in_progress
    assert c.alpha == 1.0 and c.backlog_s(0) == service_s
    assert _during_swap() == before + 3

    after = c.swap_mark()                             # a batch with no swap beside it
    c.observe(8, 0.5, 0.5, 200, after)
    assert c.alpha < 1.0 and c.backlog_s(0) > service_s
    assert _during_swap() == before + 3


def test_admission_is_not_reduced_while_a_swap_runs() -> None:
    c = BeamController([16, 16, 8], slo_s=0.05, max_batch=8, hold_s=0.0, max_queue=100)
    _overloaded(c)
    assert not c.admit(50)                            # at the floor, backlog over the SLO
    with c.swapping():
        assert c.admit(50) and c.admit(99)            # a swap: only the queue bound
        assert not c.admit(100)
    assert not c.admit(50)                            # the same load after it is refused


def test_the_loop_lag_shed_waits_for_a_swap_and_skips_its_samples() -> None:
    c = BeamController([16, 16, 8], slo_s=0.05, max_batch=8, hold_s=0.0)
    _overloaded(c)

    async def scenario() -> tuple[float, bool, float]:
        lag = LoopLag(controller=c)
        task = asyncio.create_task(lag.run())
        with c.swapping():                            # the swap's thread holds the GIL
            for _ in range(10):
                time.sleep(0.08)
                await asyncio.sleep(0.011)
            during = lag.value
            lag.value = 1.0                           # late from before the swap
            shed_during = lag.sheds(c)
        lag.value = 0.0
        for _ in range(10):                           # the same lateness without a swap
            time.sleep(0.08)
            await asyncio.sleep(0.011)
        task.cancel()
        return during, shed_during, lag.value

    during, shed_during, without = asyncio.run(scenario())
    assert during == 0.0 and not shed_during
    assert without > 0.01                             # the samples count again
    lag = LoopLag(controller=c)
    lag.value = 1.0
    assert lag.sheds(c)                               # and late at the floor sheds


def test_a_real_swap_during_a_batch_is_not_observed(tmp_path: Path,
                                                    snapshots: Builder) -> None:
    """The model manager brackets its swaps with the controller's guard: a batch on the
    model thread during which a new snapshot is loaded, warmed up and swapped in is left
    out of the controller; the next batch is observed."""
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    c = BeamController([8, 8, 8], slo_s=2.0, max_batch=8)
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", 3, 1,
                       swap_guard=c.swapping)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    assert not c.swap_in_progress
    engine = Engine(mgr, catalog)
    v2 = snapshots("v2").model_update()
    seen: list[bool] = []

    def run_batch(payloads: list[Any], widths: Any) -> list[Any]:
        if mgr.version == "v1":
            assert mgr.apply_update(v2) == "ok"       # swapped while this batch runs
        seen.append(c.swap_in_progress)
        return engine.run(payloads, widths)

    async def scenario() -> list[str]:
        batcher = Batcher(run_batch, c, max_batch=8, max_wait_s=0.001)
        batcher.start()
        try:
            versions = []
            for _ in range(2):
                res, _wait, _widths = await batcher.submit(
                    RecRequest("u1", {"device": "ios"}, [], 5))
                versions.append(res.model_version)
            return versions
        finally:
            await batcher.stop()

    before = _during_swap()
    assert c.backlog_s(0) == 0.0                      # no batch observed yet
    versions = asyncio.run(scenario())
    assert versions == ["v2", "v2"] and seen == [False, False]
    assert _during_swap() == before + 1               # the first batch: left out
    assert c.backlog_s(0) > 0.0                       # the second: observed
