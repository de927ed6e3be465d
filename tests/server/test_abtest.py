"""The live A/B test: stable bucket assignment, a control model pinned across
``model-updates`` swaps (taking the id tables of newer versions of its id space, so new
ads serve in both buckets), and the bucket and serving version on every response and
impression (real HTTP, real Kafka)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.abtest import CONTROL, ONLINE, PRETRAINED, ControlModel, assign
from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from streams.kafka_io import read_all
from streams.schemas import Event, Impression
from streams.settings import KafkaSettings
from tests.server.conftest import AD_IDS, Builder, metric_value, publish_ads, ready, wait_for
from tests.support.snapshots import ServerThread, make_ads

Send = Callable[[str, Event], None]
Start = Callable[..., ServerThread]
AUTH = {"Authorization": "Bearer s3cret"}
USERS = [f"user-{i}" for i in range(40)]
SALT = "ab-test-salt"


# -- assignment ----------------------------------------------------------------------
def test_the_control_share_is_respected_within_four_standard_deviations() -> None:
    n = 20_000
    for share in (0.05, 0.1, 0.5):
        control = sum(assign(f"u{i}", share, SALT) == CONTROL for i in range(n))
        bound = 4 * (share * (1 - share) * n) ** 0.5
        assert abs(control - share * n) < bound, (share, control)


def test_assignment_is_the_same_in_another_process_with_another_hash_seed() -> None:
    users = [f"u{i}" for i in range(200)]
    here = [assign(u, 0.3, SALT) for u in users]
    code = ("from server.abtest import assign; "
            f"print(','.join(assign(u, 0.3, {SALT!r}) for u in {users!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.strip()
    assert out.split(",") == here
    assert [assign(u, 0.3, SALT) for u in users] == here          # and on every call
    assert set(here) == {CONTROL, ONLINE}


def test_a_larger_share_only_moves_users_into_control_and_a_new_salt_reshuffles() -> None:
    users = [f"u{i}" for i in range(2000)]
    small = {u for u in users if assign(u, 0.1, SALT) == CONTROL}
    large = {u for u in users if assign(u, 0.2, SALT) == CONTROL}
    assert small < large
    other = {u for u in users if assign(u, 0.1, "another-salt") == CONTROL}
    assert len(small & other) < len(small) / 2


def test_without_a_control_share_nobody_has_a_bucket() -> None:
    assert {assign(f"u{i}", 0.0, SALT) for i in range(100)} == {""}


# -- serving -------------------------------------------------------------------------
def _recommend_all(c: httpx.Client) -> dict[str, dict[str, Any]]:
    out = {}
    for user in USERS:
        r = c.post("/v1/recommend", json={"user_id": user, "request_id": f"r-{user}-"
                                          f"{len(out)}-{os.urandom(4).hex()}",
                                          "context": {"device": "ios"}, "k": 5})
        assert r.status_code == 200, r.text
        out[user] = r.json()
    return out


def _versions(bodies: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """bucket -> the model versions that answered it."""
    seen: dict[str, set[str]] = {}
    for body in bodies.values():
        seen.setdefault(body["bucket"], set()).add(body["model_version"])
    return seen


@pytest.mark.kafka
def test_a_pretrained_control_stays_pinned_while_the_online_bucket_swaps(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send) -> None:
    publish_ads(producer)
    producer("model-updates", snapshots("v1").model_update())
    srv = start_server(kafka, control_share=0.5, control_version="pretrained", ab_salt=SALT)
    expected = {u: assign(u, 0.5, SALT) for u in USERS}
    assert set(expected.values()) == {CONTROL, ONLINE}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v1"), what="v1 ready")
        before = c.get("/metrics").text       # counters are process-wide
        first = _recommend_all(c)
        assert {u: b["bucket"] for u, b in first.items()} == expected
        assert _versions(first) == {CONTROL: {"v1"}, ONLINE: {"v1"}}

        producer("model-updates", snapshots("v2").model_update())
        wait_for(lambda: ready(c, "v2"), what="the online bucket on v2")
        second = _recommend_all(c)
        assert {u: b["bucket"] for u, b in second.items()} == expected
        assert _versions(second) == {CONTROL: {"v1"}, ONLINE: {"v2"}}

        # a third version and a rollback of the online bucket: the control never moves
        producer("model-updates", snapshots("v3").model_update())
        wait_for(lambda: ready(c, "v3"), what="the online bucket on v3")
        r = c.post("/v1/models/rollback", headers=AUTH, json={"version": "v2"})
        assert r.status_code == 200 and r.json()["serving"] == "v2", r.text
        third = _recommend_all(c)
        assert _versions(third) == {CONTROL: {"v1"}, ONLINE: {"v2"}}

        models = c.get("/v1/models", headers=AUTH).json()
        assert models["serving"] == "v2"
        assert models["ab"]["online"]["version"] == "v2"
        assert models["ab"]["control"]["version"] == "v1"
        assert models["ab"]["control"]["source"] == "shared"
        readyz = c.get("/readyz").json()
        assert readyz["ab"]["control"]["version"] == "v1" and readyz["ab"]["control_share"] == 0.5
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_ab_model_version_info",
                            'bucket="control",version="v1"') == 1
        assert metric_value(text, "adloop_server_ab_model_version_info",
                            'bucket="online",version="v2"') == 1
        assert metric_value(text, "adloop_server_ab_model_version_info",
                            'bucket="online",version="v1"') == 0      # the old label is gone
        n_control = sum(b == CONTROL for b in expected.values())

        def grew(name: str, labels: str) -> float:
            return metric_value(text, name, labels) - metric_value(before, name, labels)

        assert grew("adloop_server_ab_impressions_total", 'bucket="control"') == 3 * n_control
        assert grew("adloop_server_ab_requests_total", 'bucket="online"') \
            == 3 * (len(USERS) - n_control)
        assert metric_value(text, "adloop_server_ab_control_share_ratio") == 0.5
        # the online bucket's serving gauge names the online version only
        assert metric_value(text, "adloop_server_model_version_info", 'version="v2"') == 1

    answers = {b["request_id"]: b for b in [*first.values(), *second.values(),
                                            *third.values()]}
    imps: list[Impression] = [r.record for r in read_all(kafka, "impressions", timeout_s=60,
                                                         expect=len(answers))]
    mine = [i for i in imps if i.request_id in answers]
    assert len(mine) == len(answers)
    for imp in mine:
        body = answers[imp.request_id]
        assert imp.bucket == body["bucket"] == expected[imp.user_id]
        assert imp.model_version == body["model_version"]
        assert [s.ad_id for s in imp.slate] == [a["ad_id"] for a in body["ads"]]


@pytest.mark.kafka
def test_a_version_control_loads_from_the_history_and_until_then_serves_nobody(
        kafka: KafkaSettings, start_server: Start, snapshots: Builder, producer: Send,
        tmp_path: Path) -> None:
    publish_ads(producer)
    producer("model-updates", snapshots("v1", data_watermark=100.0).model_update())
    producer("model-updates", snapshots("v2", data_watermark=200.0).model_update())
    # the control version is announced later, with older data than the online bucket's
    control_snap = snapshots("v0", data_watermark=50.0)
    srv = start_server(kafka, control_share=0.5, control_version="v0", ab_salt=SALT)
    expected = {u: assign(u, 0.5, SALT) for u in USERS}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v2"), what="the online bucket on v2")
        before = c.get("/metrics").text
        waiting = _recommend_all(c)
        # control users are outside the test (bucket "") and get the online model
        assert {u: b["bucket"] for u, b in waiting.items()} == {
            u: ("" if b == CONTROL else ONLINE) for u, b in expected.items()}
        assert _versions(waiting) == {"": {"v2"}, ONLINE: {"v2"}}
        models = c.get("/v1/models", headers=AUTH).json()
        assert models["ab"]["control"]["version"] is None
        assert "waiting for v0" in models["ab"]["control"]["detail"]
        text = c.get("/metrics").text
        name = "adloop_server_ab_control_unavailable_total"
        assert metric_value(text, name) - metric_value(before, name) \
            == sum(b == CONTROL for b in expected.values())

        producer("model-updates", control_snap.model_update())   # stale for online
        wait_for(lambda: c.get("/v1/models", headers=AUTH).json()["ab"]["control"]
                 ["version"] == "v0", what="the control model loaded")
        pinned = _recommend_all(c)
        assert {u: b["bucket"] for u, b in pinned.items()} == expected
        assert _versions(pinned) == {CONTROL: {"v0"}, ONLINE: {"v2"}}
        assert c.get("/v1/models", headers=AUTH).json()["ab"]["control"]["source"] == "loaded"
        text = c.get("/metrics").text
        assert metric_value(text, "adloop_server_swaps_total", 'result="stale"') >= 1
        # the serving gauges still describe the online bucket after the control's load
        assert metric_value(text, "adloop_server_model_version_info", 'version="v2"') == 1
        assert metric_value(text, "adloop_server_model_version_info", 'version="v0"') == 0
        assert metric_value(text, "adloop_server_snapshot_data_watermark_timestamp_seconds") \
            == 200.0

        producer("model-updates", snapshots("v3", data_watermark=300.0).model_update())
        wait_for(lambda: ready(c, "v3"), what="the online bucket on v3")
        assert _versions(_recommend_all(c)) == {CONTROL: {"v0"}, ONLINE: {"v3"}}
    srv.__exit__(None, None, None)
    assert (tmp_path / "cache" / "control-model" / "v0" / "manifest.json").is_file()

    # a restart that sees no record of v0 (only --snapshot): the control cache has it
    restarted = start_server(kafka, control_share=0.5, control_version="v0", ab_salt=SALT,
                             snapshot=snapshots("v4").directory, follow_model_updates=False,
                             log_impressions=False)
    with httpx.Client(base_url=restarted.url, timeout=30) as c:
        wait_for(lambda: ready(c, "v4"), what="v4 from --snapshot")
        wait_for(lambda: c.get("/v1/models", headers=AUTH).json()["ab"]["control"]
                 ["version"] == "v0", what="the control from its cache")
        assert _versions(_recommend_all(c)) == {CONTROL: {"v0"}, ONLINE: {"v4"}}


# -- the control bucket and new ads ----------------------------------------------------

def test_the_control_takes_the_id_table_of_newer_versions_so_it_serves_new_ads(
        tmp_path: Path, snapshots: Builder) -> None:
    new_ads = ["ad-new-0", "ad-new-1", "ad-new-2"]
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads([*AD_IDS, *new_ads]))
    online = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "online", 3, 1)
    control = ControlModel(PRETRAINED, online, catalog, None, tmp_path / "control",
                           ModelManager(catalog, resolve_provider("cpu"),
                                        tmp_path / "control", 3, 1))
    assert online.apply_update(snapshots("v1").model_update()) == "ok"
    assert control.after_online_load()
    assert control.state is not None and control.state.trie.n_ads == len(AD_IDS)
    v1_runtime = control.state.model.runtime

    # v2: the same id space with three ads placed since
    assert online.apply_update(snapshots("v2", extra_ad_ids=new_ads).model_update()) == "ok"
    assert not control.after_online_load() and control.adopt_new_ads()
    state = control.state
    assert state is not None and state.model.version == "v1"
    assert state.model.runtime is v1_runtime                    # v1's graphs, v2's ids
    assert state.trie.n_ads == len(AD_IDS) + len(new_ads)
    online_ids = online.state.model.manifest if online.state else None
    assert online_ids is not None
    for ad in new_ads:
        row = state.model.row_of[ad]
        assert list(state.model.manifest.ids[row]) == \
            list(online_ids.ids[online_ids.ad_ids.index(ad)])
    engine = Engine(control.models, catalog, score_catalogue_max=10**6)
    [res] = engine.run([RecRequest("u", {"device": "ios"}, [], len(AD_IDS) + 3)],
                       lambda levels, k: [2] * levels)
    assert set(new_ads) <= {a.ad_id for a in res.ads}
    assert not control.adopt_new_ads()                          # nothing newer: no change

    # another id space (a tokenizer refit) is never mixed into the control's
    assert online.apply_update(snapshots("v3", id_seed=7,
                                         extra_ad_ids=[*new_ads, "ad-new-3"])
                               .model_update()) == "ok"
    assert not control.adopt_new_ads()
    assert "ad-new-3" not in control.state.model.row_of
