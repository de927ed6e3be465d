"""Multi-token prediction through the decoder: future ids are decoded by the decoder's
blocks, the served path never sees the horizon embeddings, the loss is Σ_h γ_h CE_h,
old pooled-MTP checkpoints load, and the online step leaves MTP alone."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from learner import synthetic
from learner.checkpoint import load_checkpoint, load_model, save_checkpoint
from learner.data import Batch, build_examples
from learner.export import graphs, reference_inputs, torch_outputs
from learner.losses import mtp_loss
from learner.model import GenerativeRecommender
from learner.pretrain import PretrainSettings, pretrain
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner, lists_to_batch
from learner.tokenizer import UASIDTokenizer
from tests.learner.conftest import small_cfg


def _batch(tok: UASIDTokenizer, log: synthetic.SyntheticLog, n: int = 24) -> Batch:
    ex = build_examples(log.feedback[:300], tok, history_len=10, mtp_heads=2)
    pos = ex.positives
    b = ex.batch(np.concatenate([pos[: n // 2], pos[-(n - n // 2):]]))  # early and late ones
    assert b.mtp_mask.sum() > 0 and (b.mtp_mask == 0).any()   # some horizons are missing
    return b


def test_mtp_gradient_goes_through_the_decoder_blocks(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    b = _batch(small_tokenizer, synth_log)
    grads: dict[str, dict[str, torch.Tensor | None]] = {}
    for mode in ("decoder", "pooled"):
        model = GenerativeRecommender(small_cfg(small_tokenizer, mtp_mode=mode))
        out = model(b.history, b.history_mask, b.context, b.target, None, b.mtp, b.mtp_mask)
        mtp_loss(out["mtp"], b.mtp, b.mtp_mask).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    dec = grads["decoder"]
    # every decoder block, lower (0..N-M-1) and top (N-M..N-1), learns from MTP
    for i in range(4):
        g = dec[f"decoder.blocks.{i}.attn_c.q.weight"]
        assert g is not None and float(g.abs().sum()) > 0, i
    for name in ("decoder.blocks.3.attn_s.q.weight", "decoder.bos", "decoder.level_query",
                 "mtp.horizon", "decoder.head_w", "encoder.blocks.0.mlp.fc.weight"):
        g = dec[name]
        assert g is not None and float(g.abs().sum()) > 0, name
    # the pooled form skips the decoder's blocks
    assert grads["pooled"]["decoder.blocks.3.attn_c.q.weight"] is None


def test_each_horizon_is_decoded_teacher_forced_from_its_own_level_queries(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(1)
    b = _batch(small_tokenizer, synth_log, 6)
    model = GenerativeRecommender(small_cfg(small_tokenizer, mtp_mode="decoder")).eval()
    dec = model.decoder
    with torch.no_grad():
        model.mtp.horizon.normal_()                # horizons clearly apart from horizon 0
        out = model(b.history, b.history_mask, b.context, b.target, None, b.mtp, b.mtp_mask)
        memory, mask, _, kv = model.encode(b.history, b.history_mask, b.context)
        B, n = b.mtp.shape[:2]
        for i in range(B):
            for h in range(n):
                got = out["mtp"][i, h]
                if b.mtp_mask[i, h] == 0:
                    assert float(got.abs().sum()) == 0.0   # not decoded, masked in the loss
                    continue
                m, mm = memory[i:i + 1], mask[i:i + 1]
                lower = dec.lower(m, mm, model.mtp.horizon[h:h + 1])
                want = dec.project(dec.top(kv[i:i + 1], mm, lower, b.mtp[i:i + 1, h, :-1]))[0]
                assert torch.allclose(got, want, atol=1e-5)
                # horizon 0 (plain teacher forcing) gives other logits for the same id
                plain = dec.teacher_forced(kv[i:i + 1], mm, dec.lower(m, mm), b.mtp[i:i + 1, h])
                assert not torch.allclose(got, plain[0], atol=1e-3)
    # causal teacher forcing: changing the future id's level t moves levels > t only
    alt = b.mtp.clone()
    alt[:, :, 1] = (alt[:, :, 1] + 1) % small_tokenizer.config.token_sizes[1]
    with torch.no_grad():
        out2 = model(b.history, b.history_mask, b.context, b.target, None, alt, b.mtp_mask)
    assert torch.allclose(out2["mtp"][..., :2, :], out["mtp"][..., :2, :], atol=1e-6)
    on = b.mtp_mask > 0
    assert not torch.allclose(out2["mtp"][on][:, 2:], out["mtp"][on][:, 2:])


def test_served_path_is_the_same_with_and_without_horizon_embeddings(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(2)
    b = _batch(small_tokenizer, synth_log, 8)
    with_mtp = GenerativeRecommender(
        small_cfg(small_tokenizer, mtp_heads=3, mtp_mode="decoder")).eval()
    without = GenerativeRecommender(
        small_cfg(small_tokenizer, mtp_heads=0, mtp_mode="decoder")).eval()
    state = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    assert set(with_mtp.state_dict()) - set(state) == {"mtp.horizon"}
    without.load_state_dict(state)
    _, ids = small_tokenizer.id_array()
    inputs = reference_inputs(with_mtp, ids)
    assert set(inputs) == set(graphs(with_mtp))      # exactly the exported graphs

    def served(model: GenerativeRecommender) -> list[torch.Tensor]:
        with torch.no_grad():
            tf = model(b.history, b.history_mask, b.context, b.target)["logits"]
            graph_out = torch_outputs(model, inputs)
        return [tf] + [torch.from_numpy(v) for g in graph_out.values() for v in g.values()]

    ref = served(with_mtp)
    with torch.no_grad():
        with_mtp.mtp.horizon.normal_(std=10.0)       # horizons that matter a lot in training
    for a, c, d in zip(ref, served(with_mtp), served(without), strict=True):
        assert torch.equal(a, c) and torch.equal(a, d)


def test_mtp_loss_is_the_gamma_weighted_sum_of_masked_horizon_ces() -> None:
    # V = 2, every logit row (log 3, 0): p(code 0) = 3/4, p(code 1) = 1/4
    logits = torch.tensor([math.log(3.0), 0.0]).expand(2, 2, 2, 2).clone()  # [B, n, T, V]
    target = torch.tensor([[[0, 0], [1, 0]],     # row 0: h=1 CE 2·log(4/3); h=2 log 4 + log 4/3
                           [[1, 1], [1, 1]]])    # row 1: h=1 CE 2·log 4; h=2 masked
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    a, c = math.log(4 / 3), math.log(4.0)
    ce1, ce2 = (2 * a + 2 * c) / 2, c + a        # CE_h: mean over the rows that have it
    assert abs(float(mtp_loss(logits, target, mask)) - (ce1 + 0.5 * ce2)) < 1e-6
    assert abs(float(mtp_loss(logits, target, mask, gamma=0.25)) - (ce1 + 0.25 * ce2)) < 1e-6
    assert abs(float(mtp_loss(logits, target, mask, gammas=[0.0, 1.0])) - ce2) < 1e-6
    # a masked horizon's logits do not matter
    logits[1, 1] = torch.tensor([50.0, -50.0])
    assert abs(float(mtp_loss(logits, target, mask)) - (ce1 + 0.5 * ce2)) < 1e-6
    # no horizons: no loss
    assert float(mtp_loss(logits[:, :0], target[:, :0], mask[:, :0])) == 0.0


def test_old_pooled_mtp_checkpoints_load_and_resume_in_their_form(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog, tmp_path: Path,
        make_settings: Callable[..., PretrainSettings]) -> None:
    # a run written before mtp_mode existed: pooled MTP heads, no mtp_mode in its config
    run = tmp_path / "old"
    kw = dict(steps=2, batch_size=16, held_out_frac=0.0, d_model=16, n_layer=2,
              value_epochs=0)    # the checkpoint's form is the point, not the value fit
    pretrain(make_settings(run, mtp_mode="pooled", **kw), synth_log.ads, synth_log.feedback)
    ck = load_checkpoint(run)
    del ck["config"]["mtp_mode"]
    torch.save(ck, run / "checkpoint.pt")
    model, _, _ = load_model(run)
    assert model.cfg.mtp_mode == "pooled"
    assert any(k.startswith("mtp.heads.") for k in model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, ck["model"][k]), k
    # resuming it with decoder MTP asked for keeps the checkpoint's form
    res = pretrain(make_settings(run, **{**kw, "steps": 4, "mtp_mode": "decoder"}),
                   synth_log.ads, synth_log.feedback)
    assert res.step == 4 and res.model.cfg.mtp_mode == "pooled"
    # new checkpoints say which form they hold
    new = tmp_path / "new"
    m = GenerativeRecommender(small_cfg(small_tokenizer, mtp_mode="decoder"))
    small_tokenizer.save(new / "tokenizer")
    save_checkpoint(new, m, small_tokenizer.id_space_version, 0)
    assert load_checkpoint(new)["config"]["mtp_mode"] == "decoder"
    loaded, _, _ = load_model(new)
    assert loaded.cfg.mtp_mode == "decoder"
    assert torch.equal(loaded.mtp.horizon, m.mtp.horizon)


def test_the_online_step_trains_no_mtp(small_tokenizer: UASIDTokenizer,
                                       synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(3)
    model = GenerativeRecommender(small_cfg(small_tokenizer, mtp_mode="decoder"))
    before = copy.deepcopy(model.mtp.state_dict())
    learner = OnlineLearner(model, RSPOConfig(), lr=1e-2, weight_decay=0.1)
    lists = [(fb, 1.0) for fb in synth_log.feedback[:16]]
    learner.update(lists_to_batch(lists, small_tokenizer, model))
    assert model.mtp.horizon.grad is None
    assert all(torch.equal(v, before[k]) for k, v in model.mtp.state_dict().items())
    assert not np.allclose(model.decoder.level_query.detach().numpy(),
                           learner.ref.decoder.level_query.numpy())   # the rest did train
