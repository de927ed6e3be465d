"""Hierarchical prior heads ("Don't Waste It"): interaction type × time horizon, routed
training offline and online, a predicted per-request mixture at inference, exported."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from learner import synthetic
from learner.beam import IdTrie, OrtBackend, TorchBackend, beam_search
from learner.data import build_examples, horizon_of
from learner.evaluate import trie_of
from learner.export import export_snapshot, verify_snapshot
from learner.losses import level_ce
from learner.model import GenerativeRecommender, ModelConfig
from learner.pretrain import PretrainResult, PretrainSettings, pretrain
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner, lists_to_batch
from learner.tokenizer import UASIDTokenizer
from snapshot_format import PRIOR_LOG_MIX
from streams.schemas import Feedback, FeedbackItem


def _cfg(tok: UASIDTokenizer, **kw: object) -> ModelConfig:
    base: dict[str, object] = dict(level_sizes=tok.config.token_sizes,
                                   semantic_levels=tok.config.semantic_levels, history_len=10,
                                   d_model=32, n_head=4, n_enc_layer=1, n_layer=2, n_top=1,
                                   prior_heads=2)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_prior(synth_log: synthetic.SyntheticLog, tmp_path_factory: pytest.TempPathFactory,
                  make_settings: type[PretrainSettings]) -> PretrainResult:
    run_dir = tmp_path_factory.mktemp("prior") / "run"
    return pretrain(make_settings(run_dir, prior_heads=2), synth_log.ads, synth_log.feedback)


def test_leaves_compose_hierarchically_type_then_horizon(
        small_tokenizer: UASIDTokenizer) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(_cfg(small_tokenizer)).eval()
    dec = model.decoder
    assert dec.n_leaves == 4 and len(dec.priors) == 2 and len(dec.prior_sub) == 4
    h = torch.randn(5, 3, 32)
    with torch.no_grad():
        zs = dec.prior_states(h)
        for t in range(2):                         # z_type = h + MLP_type(h)
            z_type = h + dec.priors[t](h)
            for hz in range(2):                    # z_{type,hz} = z_type + MLP_{type,hz}(z_type)
                leaf = t * 2 + hz
                assert torch.allclose(zs[leaf], z_type + dec.prior_sub[leaf](z_type), atol=1e-6)
        before = [dec.project(h, 0, torch.full((5,), leaf)) for leaf in range(4)]
        # MLP_{click,long} moves only its own leaf: the conversion heads are untouched
        for p in dec.prior_sub[1].parameters():
            p.add_(torch.randn_like(p))
        after = [dec.project(h, 0, torch.full((5,), leaf)) for leaf in range(4)]
        assert torch.equal(before[0], after[0])
        assert torch.equal(before[2], after[2]) and torch.equal(before[3], after[3])
        assert not torch.allclose(before[1], after[1])
        # the click type head moves both click leaves and no conversion leaf
        for p in dec.priors[0].parameters():
            p.add_(torch.randn_like(p))
        again = [dec.project(h, 0, torch.full((5,), leaf)) for leaf in range(4)]
        assert not torch.allclose(after[0], again[0]) and not torch.allclose(after[1], again[1])
        assert torch.equal(after[2], again[2]) and torch.equal(after[3], again[3])


def _item(ad_id: str, pos: int, clicked: bool = False, converted: bool = False,
          reward: float = 0.0) -> FeedbackItem:
    return FeedbackItem(ad_id=ad_id, semantic_id=[], position=pos, score=0.0, bid=10.0,
                        bid_type="cpa", clicked=clicked, converted=converted, reward=reward)


def test_routing_labels_by_interaction_type_and_horizon_offline_and_online(
        small_tokenizer: UASIDTokenizer) -> None:
    """History (most recent first) with level-0 codes [a, b, c, d]: with short_horizon 3 a
    target of code a is short-term, of code d (4th most recent) or an unseen code
    long-term; a click routes to the click heads, a conversion to the conversion heads."""
    tok = small_tokenizer
    ad_ids, arr = tok.id_array()
    codes = sorted({int(c) for c in arr[:, 0]})
    assert len(codes) >= 5
    a, b, c, d, unseen = codes[:5]
    by_code = {k: [x for x, row in zip(ad_ids, arr.tolist(), strict=True) if row[0] == k]
               for k in codes}
    history = [by_code[k][0] for k in (a, b, c, d)]
    items = [_item(by_code[a][-1], 0, clicked=True, reward=10.0),            # click, short
             _item(by_code[d][-1], 1, clicked=True, converted=True, reward=30.0),  # conv, long
             _item(by_code[unseen][0], 2, clicked=True, reward=10.0),        # click, long
             _item(by_code[c][-1], 3, clicked=True, converted=True, reward=30.0),  # conv, short
             _item(by_code[b][-1], 4)]                                        # not a positive
    fb = Feedback(request_id="r1", user_id="u1", kind="final", revision=0,
                  impression_time=1.0, event_time=2.0, elapsed_s=1.0, window_closed=True,
                  recent_ad_ids=history, model_version="m", items=items)
    ex = build_examples([fb], tok, history_len=10, short_horizon=3)
    assert ex.prior.tolist() == [0, 1, 0, 1]
    assert ex.horizon.tolist() == [0, 1, 1, 0]
    assert build_examples([fb], tok, history_len=10, short_horizon=4).horizon.tolist() == \
        [0, 0, 1, 0]
    model = GenerativeRecommender(_cfg(tok))
    assert model.decoder.leaf(torch.from_numpy(ex.prior),
                              torch.from_numpy(ex.horizon)).tolist() == [0, 3, 1, 2]
    lb = lists_to_batch([(fb, 1.0)], tok, model)                  # online: per slate item
    assert lb.horizon is not None and lb.horizon[0].tolist() == [0, 1, 1, 0, 0]
    # padding rows (code 0, mask 0) never make a target short-term
    hist = np.zeros((1, 4, 2), np.int64)
    assert horizon_of(hist, np.zeros((1, 4), np.float32), np.zeros((1, 1, 2), np.int64),
                      3).tolist() == [[1]]


def test_routed_loss_reaches_only_the_routed_heads(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(_cfg(small_tokenizer))
    ex = build_examples(synth_log.feedback[:60], small_tokenizer, history_len=10)
    b = ex.batch(ex.positives[:16])
    leaf = torch.full((16,), 1)                                   # every target: (click, long)
    out = model(b.history, b.history_mask, b.context, b.target, leaf)
    level_ce(out["prior_logits"], b.target).mean().backward()
    dec = model.decoder

    def moved(m: torch.nn.Module) -> bool:
        return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())

    assert moved(dec.priors[0]) and moved(dec.prior_sub[1])
    assert not any(moved(m) for m in (dec.priors[1], dec.prior_sub[0], dec.prior_sub[2],
                                      dec.prior_sub[3]))
    assert dec.prior_clf is not None and not moved(dec.prior_clf)


def test_predicted_mixture_sums_to_one_varies_per_request_and_mixes_the_step(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(_cfg(small_tokenizer)).eval()
    assert model.decoder.prior_clf is not None
    for p in model.decoder.prior_clf.parameters():   # a classifier with an opinion
        torch.nn.init.normal_(p, std=0.5)
    ex = build_examples(synth_log.feedback[:30], small_tokenizer, history_len=10)
    b = ex.batch(np.unique(ex.request, return_index=True)[1][5:9])   # 4 requests
    with torch.no_grad():
        memory, mask, lower, kv = model.encode(b.history, b.history_mask, b.context)
        mix = model.prior_log_mix(memory, mask)
        assert mix is not None and mix.shape == (4, 4)
        assert torch.allclose(mix.exp().sum(-1), torch.ones(4), atol=1e-6)
        assert float((mix[0] - mix[1]).abs().max()) > 1e-3      # per request
        # the step's distribution is the mixture of the leaves' softmaxes
        prefix = b.target[:, :1]
        got = torch.log_softmax(model.decoder.step(kv, mask, lower, None, prefix, mix), -1)
        h = model.decoder.top(kv, mask, lower, prefix, last_only=True)
        leaves = torch.stack([torch.log_softmax(model.decoder.project(
            h, 1, torch.full((4,), j))[:, 0], -1) for j in range(4)], 1)   # [B, L, V]
        want = torch.logsumexp(leaves + mix[:, :, None], 1)
        V1 = small_tokenizer.config.token_sizes[1]
        assert torch.allclose(got[:, :V1], want[:, :V1], atol=1e-5)


def test_fixed_mode_mixes_by_prior_mix_and_old_checkpoints_load_flat(
        small_tokenizer: UASIDTokenizer) -> None:
    cfg = _cfg(small_tokenizer, prior_mix_mode="fixed", prior_mix=(0.4, 0.3, 0.2, 0.1))
    model = GenerativeRecommender(cfg)
    assert model.decoder.prior_clf is None
    mix = model.prior_log_mix(torch.zeros(3, 5, 32), torch.ones(3, 5))
    assert mix is not None
    assert torch.allclose(mix.exp(), torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    # a checkpoint config written before horizons and the classifier: flat type heads
    old = {k: v for k, v in _cfg(small_tokenizer, prior_horizons=1, prior_mix_mode="fixed",
                                  prior_mix=(0.7, 0.3)).to_json().items()
           if k not in ("prior_horizons", "prior_mix_mode", "short_horizon")}
    flat = GenerativeRecommender(ModelConfig.from_json(old))
    assert flat.decoder.n_leaves == 2 and len(flat.decoder.prior_sub) == 0
    flat.load_state_dict(GenerativeRecommender(ModelConfig.from_json(old)).state_dict())
    with pytest.raises(ValueError, match="prior_mix"):
        _cfg(small_tokenizer, prior_mix=(0.5, 0.5))             # 4 leaves need 4 weights


def test_online_update_trains_the_routed_leaves_and_the_classifier(
        trained_prior: PretrainResult, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = copy.deepcopy(trained_prior.model)
    learner = OnlineLearner(model, RSPOConfig(), lr=1e-3)
    lists = [(fb, 1.0) for fb in synth_log.feedback if any(it.clicked for it in fb.items)][:32]
    batch = lists_to_batch(lists, trained_prior.tokenizer, model)
    before = {k: v.clone() for k, v in model.decoder.state_dict().items()
              if k.startswith(("priors.", "prior_sub.", "prior_clf."))}
    m = learner.update(batch)
    assert m["prior"] > 0 and m["prior"] == m["prior"]
    after = model.decoder.state_dict()
    for prefix in ("priors.1.", "prior_sub.0.", "prior_sub.1.", "prior_clf."):
        assert any(not torch.equal(before[k], after[k]) for k in before
                   if k.startswith(prefix)), prefix
    no_prior = OnlineLearner(copy.deepcopy(trained_prior.model), RSPOConfig(), lr=1e-3,
                             prior_weight=0.0)
    assert no_prior.update(batch)["prior"] > 0           # reported, weighted by 0


def test_pretrained_prior_heads_learn_the_routing_and_export_with_parity(
        trained_prior: PretrainResult, synth_log: synthetic.SyntheticLog,
        tmp_path: Path) -> None:
    model, tok = trained_prior.model.eval(), trained_prior.tokenizer
    assert model.cfg.prior_leaves == 4 and model.cfg.prior_mix_mode == "predicted"
    chance = 10 / len(tok)
    assert trained_prior.metrics["recall@10"] > 3 * chance, trained_prior.metrics
    # the classifier learned the routing labels: held-out CE below the uniform log 4
    ex = build_examples(synth_log.feedback[-300:], tok, history_len=10)
    b = ex.batch(ex.positives)
    leaf = model.decoder.leaf(b.prior, b.horizon)
    with torch.no_grad():
        memory, mask, _, _ = model.encode(b.history, b.history_mask, b.context)
        logits = model.decoder.prior_logits(memory, mask)
        assert logits is not None
        assert float(F.cross_entropy(logits, leaf)) < float(np.log(4)) - 0.05

    out = tmp_path / "v1"
    manifest = export_snapshot(model, tok, out, "v1")
    assert manifest["prior_heads"] == {"types": 2, "horizons": 2, "leaves": 4,
                                       "mix_mode": "predicted", "short_horizon": 3}
    assert manifest["metrics"]["parity_max_abs_diff"] <= 1e-4
    verify_snapshot(out, parity=True)
    enc = ort.InferenceSession(str(out / "encoder.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(out / "decoder_step.onnx"),
                                providers=["CPUExecutionProvider"])
    assert PRIOR_LOG_MIX in [o.name for o in enc.get_outputs()]
    assert PRIOR_LOG_MIX in [i.name for i in step.get_inputs()]
    # new batch and beam shapes: the encoder's mixture and every step match torch
    rng = np.random.default_rng(3)
    _, ids = tok.id_array()
    B, N = 5, 17
    bb = ex.batch(np.arange(B))
    feeds = {"history": bb.history.numpy(), "history_mask": bb.history_mask.numpy(),
             "context": bb.context.numpy()}
    _, mmask_o, lower_o, kv_o, mix_o = enc.run(None, feeds)
    with torch.no_grad():
        t_enc = model.encode(bb.history, bb.history_mask, bb.context)
        t_mix = model.prior_log_mix(t_enc[0], t_enc[1])
    assert t_mix is not None
    assert np.abs(mix_o - t_mix.numpy()).max() <= 1e-4
    assert np.allclose(np.exp(mix_o).sum(-1), 1.0, atol=1e-5)
    beam_request = rng.integers(B, size=N).astype(np.int64)
    for P in range(tok.config.id_len):
        prefix = ids[rng.integers(len(ids), size=N), :P].astype(np.int64)
        (logits,) = step.run(None, {"memory_kv": kv_o, "memory_mask": mmask_o,
                                    "lower": lower_o, "beam_request": beam_request,
                                    "prefix": prefix, PRIOR_LOG_MIX: mix_o})
        with torch.no_grad():
            want = model.decoder.step(t_enc[3], t_enc[1], t_enc[2],
                                      torch.from_numpy(beam_request), torch.from_numpy(prefix),
                                      t_mix)
        assert np.abs(logits - want.numpy()).max() <= 1e-4, P
    # the learner's ONNX beam search = its torch beam search (same mixture per request)
    trie: IdTrie = trie_of(tok)[0]
    t_res = beam_search(TorchBackend(model), bb.history, bb.history_mask, bb.context, trie, 8)
    o_res = beam_search(OrtBackend(out), bb.history, bb.history_mask, bb.context, trie, 8)
    assert torch.equal(t_res.rows, o_res.rows)


def test_fixed_mode_exports_the_fixed_mixture_for_every_request(
        small_tokenizer: UASIDTokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    mix = (0.4, 0.3, 0.2, 0.1)
    model = GenerativeRecommender(_cfg(small_tokenizer, prior_mix_mode="fixed",
                                       prior_mix=mix)).eval()
    manifest = export_snapshot(model, small_tokenizer, tmp_path / "v1", "v1")
    assert manifest["prior_heads"]["mix_mode"] == "fixed"
    verify_snapshot(tmp_path / "v1", parity=True)
    enc = ort.InferenceSession(str(tmp_path / "v1" / "encoder.onnx"),
                               providers=["CPUExecutionProvider"])
    B, H, T = 3, 6, small_tokenizer.config.id_len
    n_ctx = len(model.cfg.context_features) + model.cfg.organic_len
    (out,) = enc.run([PRIOR_LOG_MIX], {"history": np.zeros((B, H, T), np.int64),
                                       "history_mask": np.ones((B, H), np.float32),
                                       "context": np.zeros((B, n_ctx), np.int64)})
    assert np.allclose(np.exp(out), np.array([mix] * B), atol=1e-6)
