"""Snapshot verification, refusal and rollback at the ModelManager level (no HTTP)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server.catalog import AdCatalog
from server.engine import Engine, RecRequest
from server.models import ModelManager
from server.runtime import resolve_provider
from tests.server.conftest import AD_IDS, Builder
from tests.support.snapshots import make_ads


def _manager(tmp_path: Path, keep: int = 3) -> tuple[ModelManager, Engine]:
    catalog = AdCatalog()
    catalog.apply((a.ad_id, a) for a in make_ads(AD_IDS))
    mgr = ModelManager(catalog, resolve_provider("cpu"), tmp_path / "cache", keep, 1)
    return mgr, Engine(mgr, catalog)


def _recommend(engine: Engine) -> tuple[str, list[str]]:
    (res,) = engine.run([RecRequest("u1", {"device": "ios"}, ["ad-0001"], 5)],
                        lambda levels, k: [8] * levels)
    return res.model_version, [a.ad_id for a in res.ads]


def test_import_server_app_does_not_import_torch() -> None:
    code = ("import sys, server.app, server.service, server.api; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'learner' not in sys.modules, 'learner imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_good_snapshot_loads_and_serves(tmp_path: Path, snapshots: Builder) -> None:
    mgr, engine = _manager(tmp_path)
    snap = snapshots("v1")
    assert mgr.apply_update(snap.model_update()) == "ok"
    version, ads = _recommend(engine)
    assert version == "v1" and len(ads) == 5 and set(ads) <= set(AD_IDS)


@pytest.mark.parametrize("fault,step", [
    ({"corrupt": "decoder_step.onnx"}, "load"),
    ({"bad_checksum": "value.onnx"}, "checksum"),
    ({"nan": True}, "nan"),
    ({"parity_fail": True}, "parity"),
])
def test_a_bad_snapshot_is_refused_and_the_old_one_keeps_serving(
        tmp_path: Path, snapshots: Builder, fault: dict[str, object], step: str) -> None:
    mgr, engine = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    bad = snapshots("v2", **fault)
    assert mgr.apply_update(bad.model_update()) == step
    assert mgr.version == "v1"
    assert _recommend(engine)[0] == "v1"
    assert {v["version"]: v["status"] for v in mgr.describe()["versions"]}["v2"] == "failed"
    assert not (tmp_path / "cache" / "v2").exists()


def test_a_wrong_manifest_checksum_in_the_update_is_refused(tmp_path: Path,
                                                            snapshots: Builder) -> None:
    mgr, _ = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    update = snapshots("v2").model_update(sha256="0" * 64)
    assert mgr.apply_update(update) == "checksum"
    assert mgr.version == "v1"


def test_an_unreachable_store_is_refused(tmp_path: Path, snapshots: Builder) -> None:
    mgr, _ = _manager(tmp_path)
    update = snapshots("v1").model_update(uri=(tmp_path / "nowhere").as_uri())
    assert mgr.apply_update(update) == "fetch"
    assert mgr.state is None


@pytest.mark.parametrize("layout", ["flat", "short_names"])
def test_other_parity_layouts_are_read_too(tmp_path: Path, snapshots: Builder,
                                           layout: str) -> None:
    mgr, _ = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1", parity_layout=layout).model_update()) == "ok"
    assert mgr.apply_update(snapshots("v2", parity_layout=layout,
                                      parity_fail=True).model_update()) == "parity"


def test_rollback_serves_the_previous_version_and_keeps_n(tmp_path: Path,
                                                          snapshots: Builder) -> None:
    mgr, engine = _manager(tmp_path, keep=2)
    for v in ("v1", "v2", "v3"):
        assert mgr.apply_update(snapshots(v).model_update()) == "ok"
    assert mgr.rollback() == ("ok", "v2")
    assert _recommend(engine)[0] == "v2"
    assert mgr.rollback("v1") == ("no_candidate", "v1")        # evicted (keep 2)
    assert not (tmp_path / "cache" / "v1").exists()
    assert mgr.rollback("v3") == ("ok", "v3")
    assert mgr.version == "v3"


def test_rollback_refuses_a_tampered_cached_copy(tmp_path: Path, snapshots: Builder) -> None:
    mgr, _ = _manager(tmp_path)
    for v in ("v1", "v2"):
        assert mgr.apply_update(snapshots(v).model_update()) == "ok"
    with open(tmp_path / "cache" / "v1" / "encoder.onnx", "ab") as fh:
        fh.write(b"x")
    assert mgr.rollback("v1") == ("checksum", "v1")
    assert mgr.version == "v2"


def test_a_paused_ad_leaves_the_trie(tmp_path: Path, snapshots: Builder) -> None:
    mgr, engine = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    _, before = _recommend(engine)
    paused = make_ads([before[0]], status="paused")[0]
    mgr.catalog.apply([(paused.ad_id, paused)])
    mgr.on_catalog_change()
    assert mgr.state is not None and mgr.state.trie.n_ads == len(AD_IDS) - 1
    assert before[0] not in _recommend(engine)[1]


def test_history_and_context_inputs_follow_the_learner(tmp_path: Path,
                                                       snapshots: Builder) -> None:
    mgr, engine = _manager(tmp_path)
    snap = snapshots("v1")
    assert mgr.apply_update(snap.model_update()) == "ok"
    assert mgr.state is not None
    req = RecRequest("u", {"device": "ios", "bogus": "x"}, ["nope", "ad-0003", "ad-0001"], 3,
                     ["retail/headphones#1", "gaming/consoles#2"])
    history, mask, context = engine.inputs(mgr.state, [req])
    assert mask.tolist()[0][:3] == [1.0, 1.0, 0.0]
    assert history[0, 0].tolist() == snap.ids["ad-0003"]
    from streams.features import context_ids, hash_feature
    C = len(snap.spec.context_features)
    assert context.shape == (1, C + snap.spec.organic_len)
    assert context[0, :C].tolist() == context_ids({"device": "ios"})
    # organic topics after the context ids, most recent first, zero padding after them
    assert context[0, C:].tolist() == [hash_feature("organic", "gaming/consoles"),
                                       hash_feature("organic", "retail/headphones"), 0, 0]
    assert np.count_nonzero(context) == 3


def test_snapshots_of_older_formats_are_refused_with_a_clear_error(
        tmp_path: Path, snapshots: Builder) -> None:
    from snapshot_format import SnapshotRejectedError, parse_manifest

    mgr, engine = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    # format 1: per-beam memory into decoder_step; format 2: no organic history input;
    # format 3: a ranking decoder without the generator's keys/values
    for n, fmt in enumerate((1, 2, 3)):
        old = snapshots(f"v{n + 2}", format=fmt)
        assert mgr.apply_update(old.model_update()) == "manifest"
        assert mgr.version == "v1" and _recommend(engine)[0] == "v1"
        with pytest.raises(SnapshotRejectedError, match=rf"format {fmt} not supported: this "
                           r"server reads format 4 only \(format 4 gives the ranking decoder"):
            parse_manifest((old.directory / "manifest.json").read_bytes())


def test_a_context_the_model_cannot_read_is_counted_and_warned_once(
        tmp_path: Path, snapshots: Builder, capsys: pytest.CaptureFixture[str]) -> None:
    from server import metrics as M

    mgr, engine = _manager(tmp_path)
    assert mgr.apply_update(snapshots("v1").model_update()) == "ok"
    before = M.CONTEXT_UNMATCHED._value.get()
    engine.run([RecRequest("u1", {"device": "ios"}, [], 5)], lambda levels, k: [8] * levels)
    assert M.CONTEXT_UNMATCHED._value.get() == before            # device is a model feature
    for _ in range(2):
        engine.run([RecRequest("u1", {"segment": "b"}, [], 5)], lambda levels, k: [8] * levels)
    assert M.CONTEXT_UNMATCHED._value.get() == before + 2
    # stdout before any process configured logging, stderr after (adloop.cli does)
    out = capsys.readouterr()
    assert (out.out + out.err).count("serve.context_unmatched") == 1
