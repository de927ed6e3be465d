"""``adloop import``: a user's recorded log (own context keys, propensities, ads only in
slates) to a servable snapshot whose manifest reads the log's context keys."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from adloop import cli
from adloop.importer import choose_context_features, feedback_warnings, join_recorded
from snapshot_format import parse_manifest
from streams.joiner_core import JoinSettings
from traffic.recorded import read_recorded

LOG = Path(__file__).resolve().parents[1] / "data" / "logged_bandit.jsonl"


def _import_small(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                  steps: int) -> dict[str, Any]:
    """``adloop import`` of the checked-in log with a tiny model; its JSON summary."""
    code = cli.main(["import", "--from", str(LOG), "--run-dir", str(tmp_path / "run"),
                     "--encoder", "hashing", "--level-sizes", "8,4", "--industry-size", "4",
                     "--goal-size", "4", "--advertiser-size", "4", "--suffix-size", "4",
                     "--d-model", "16", "--n-layer", "2", "--n-enc-layer", "1",
                     "--history-len", "4", "--steps", str(steps), "--batch-size", "32",
                     "--no-progress", "--checkpoint-every", "0", "--threads", "1"])
    assert code == 0
    summary: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return summary


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_offline_join_gives_every_impression_a_final_list_with_its_propensities() -> None:
    entries = list(read_recorded(LOG, "stop"))
    n_imp = sum(e.kind == "impression" for e in entries)
    n_click = sum(e.kind == "click" for e in entries)
    joined = join_recorded(entries, JoinSettings(metrics_port=0))
    finals = joined.finals()
    assert len(finals) == n_imp and joined.rejected == []
    assert sum(i.clicked for f in finals for i in f.items) == n_click
    assert all(i.propensity == pytest.approx(1 / 24, abs=1e-6) for f in finals for i in f.items)
    assert joined.defaulted_ads == 12 and len(joined.ads) == 24
    assert choose_context_features(joined.impressions) == ("device", "segment")


def test_a_log_with_too_few_clicks_per_ad_is_named_in_a_warning() -> None:
    joined = join_recorded(read_recorded(LOG, "stop"), JoinSettings(metrics_port=0))
    finals = joined.finals()
    clicks = sum(i.clicked for f in finals for i in f.items)
    stats, warnings = feedback_warnings(finals, len(joined.ads), 2.0)
    assert stats == {"clicks": clicks, "clicks_per_ad": round(clicks / 24, 3)}
    assert clicks / 24 >= 2.0 and warnings == []
    # the same clicks spread over far more ads (a catalogue the log hardly covers)
    stats, warnings = feedback_warnings(finals, 24 * 10, 2.0)
    assert stats["clicks_per_ad"] < 1.0
    assert len(warnings) == 1 and f"{clicks} clicks on 240 ads" in warnings[0]
    assert "--explore" in warnings[0]


def test_import_makes_a_snapshot_that_reads_the_logs_context_keys(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    summary = _import_small(tmp_path, capsys, steps=20)
    assert summary["context_features"] == ["device", "segment"]
    assert summary["final_lists"] == summary["impressions"] > 0
    assert summary["clicks"] > 0 and summary["warnings"] == []
    manifest = parse_manifest((Path(summary["snapshot"]) / "manifest.json").read_bytes())
    assert tuple(manifest.context_features) == ("device", "segment")


def test_the_imported_snapshot_answers_contexts_differing_only_in_a_log_key_differently(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model reads the log's own context keys: two requests that differ only in
    ``segment`` (a key the default features do not have) get different slates."""
    import torch

    from learner.beam import IdTrie, OrtBackend, beam_search
    from streams.features import request_ids

    summary = _import_small(tmp_path, capsys, steps=100)
    snap = Path(summary["snapshot"])
    man = parse_manifest((snap / "manifest.json").read_bytes())
    trie = IdTrie(man.ids, man.level_sizes)
    segments = ["a", "b", "c", "d"]
    ctx = torch.tensor([request_ids({"device": "mobile", "segment": s}, [],
                                    man.context_features, man.context_buckets,
                                    int(man.raw.get("organic_len", 0)))
                        for s in segments], dtype=torch.long)
    hist = torch.zeros((len(segments), 1, man.id_len), dtype=torch.long)
    res = beam_search(OrtBackend(snap, threads=1), hist, torch.zeros(len(segments), 1), ctx,
                      trie, [8] * man.id_len)
    slates = {tuple(int(r) for r in res.rows[b, :3]) for b in range(len(segments))}
    scores = {tuple(round(float(x), 4) for x in res.scores[b, :3]) for b in range(len(segments))}
    assert len(scores) == len(segments)        # every segment scores the slate differently
    assert len(slates) > 1, slates            # and at least one gets other ads on top
