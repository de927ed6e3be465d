"""Pretraining: deterministic resume, the CLI from files, VSL weights, feedback revisions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from adloop import cli
from learner import synthetic
from learner.checkpoint import load_checkpoint
from learner.data import build_examples, latest_feedback
from learner.losses import value_weights, vsl_loss
from learner.pretrain import PretrainSettings, pretrain
from learner.tokenizer import UASIDTokenizer


@pytest.mark.parametrize("linear_deep", [False, True], ids=["linear-only", "deep-variant"])
def test_resumed_run_equals_uninterrupted_run(
        synth_log: synthetic.SyntheticLog, tmp_path: Path,
        make_settings: Callable[..., PretrainSettings], linear_deep: bool) -> None:
    # the value epochs and the linear fit run after training, as in a full run
    # (train_state keeps the pre-fit weights the resumed run starts from)
    kw = dict(steps=6, batch_size=32, held_out_frac=0.0, seed=3, value_epochs=3,
              value_linear_deep=linear_deep)
    straight = pretrain(make_settings(tmp_path / "a", **kw), synth_log.ads, synth_log.feedback)
    pretrain(make_settings(tmp_path / "b", **{**kw, "steps": 3}), synth_log.ads,
             synth_log.feedback)
    resumed = pretrain(make_settings(tmp_path / "b", **kw), synth_log.ads, synth_log.feedback)
    assert resumed.step == straight.step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_checkpoint(tmp_path / "b")["step"] == 6


def test_pretrain_export_evaluate_from_the_command_line(
        synth_log: synthetic.SyntheticLog, tmp_path: Path) -> None:
    ads = synthetic.write_jsonl(synth_log.ads, tmp_path / "ads.jsonl")
    fb = synthetic.write_jsonl(synth_log.feedback, tmp_path / "feedback.jsonl")
    run = tmp_path / "run"
    rc = cli.main([
        "pretrain", "--ads", str(ads), "--feedback", str(fb), "--run-dir", str(run),
        "--encoder", "hashing", "--level-sizes", "8,4", "--d-model", "16", "--n-layer", "2",
        "--n-enc-layer", "1", "--history-len", "5", "--steps", "4", "--no-progress",
        "--checkpoint-every", "2", "--eval-beam-width", "4"])
    assert rc == 0 and (run / "checkpoint.pt").exists()
    assert (run / "tokenizer" / "tokenizer.json").exists()
    rc = cli.main(["export", "--run-dir", str(run), "--out", str(tmp_path / "snap"),
                          "--version", "v1"])
    assert rc == 0 and (tmp_path / "snap" / "manifest.json").exists()
    out = tmp_path / "eval.json"
    rc = cli.main(["evaluate", "--run-dir", str(run), "--feedback", str(fb),
                          "--backend", "onnx", "--snapshot", str(tmp_path / "snap"),
                          "--beam-width", "4", "--k", "1,4", "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "recall@4" in text and "vndcg@1" in text
    # beyond accuracy of the top-4 lists
    metrics = json.loads(text)
    assert metrics["beyond_k"] == 4
    for key in ("catalogue_coverage", "sid_diversity", "novelty_unseen", "novelty_bits",
                "personalization"):
        assert metrics[key] >= 0.0, key
    assert 0.0 < metrics["catalogue_coverage"] <= 1.0


def test_value_weights_are_clipped_and_normalised() -> None:
    v = torch.tensor([0.0] + [0.01] * 10 + [1e6])
    w = value_weights(v, w_min=0.2, w_max=5.0)
    assert w[0] == 0.0  # no value, no generation loss
    assert torch.all(w[1:11] == 0.2)  # tiny values are lifted to w_min
    assert w[-1] == 5.0  # one huge bid cannot dominate
    g = torch.log1p(torch.tensor([2.0, 4.0]))
    assert torch.allclose(value_weights(torch.tensor([2.0, 4.0])), g / g.mean())
    logits = torch.zeros(2, 3, 5)
    tgt = torch.zeros(2, 3, dtype=torch.long)
    ce = 3 * torch.log(torch.tensor(5.0))
    assert torch.allclose(vsl_loss(logits, tgt, torch.tensor([1.0, 0.0])), ce)


def test_newest_feedback_revision_wins(small_tokenizer: UASIDTokenizer,
                                       synth_log: synthetic.SyntheticLog) -> None:
    import msgspec

    final = next(f for f in synth_log.feedback if any(i.converted for i in f.items))
    provisional = msgspec.structs.replace(
        final, kind="provisional", revision=0,
        items=[msgspec.structs.replace(i, converted=False, clicked=False) for i in final.items])
    final = msgspec.structs.replace(final, revision=1)
    assert latest_feedback([final, provisional]) == [final]
    ex = build_examples([provisional, final], small_tokenizer, history_len=10)
    assert len(ex.positives) == sum(i.clicked or i.converted for i in final.items)
    assert ex.prior.max() == 1  # a conversion routes to the conversion prior
    ex_p = build_examples([provisional], small_tokenizer, history_len=10)
    assert len(ex_p) == 1 and len(ex_p.positives) == 0
    assert ex_p.slate_mask.sum() == len(final.items)


@pytest.mark.parametrize("frac", [0.0, 0.2])
def test_examples_carry_history_context_mtp_and_slates(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog, frac: float) -> None:
    from learner.data import split_by_time

    ex = build_examples(synth_log.feedback, small_tokenizer, history_len=10, mtp_heads=2)
    T = small_tokenizer.config.id_len
    # six context features (device, placement, hour, region, age, interest) + 20 organic
    assert ex.history.shape[1:] == (10, T) and ex.context.shape[1] == 6 + 20
    assert ex.mtp.shape[1:] == (2, T) and ex.mtp_mask.sum() > 0
    assert (ex.history[ex.history_mask == 0] == 0).all()
    train, test = split_by_time(ex, frac)
    assert len(train) + len(test) == len(ex)
    if frac:
        assert train.time.max() <= test.time.min()
