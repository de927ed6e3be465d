"""The model: LazyAR computes its lower layers once per request, both modes learn."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from learner import synthetic
from learner.beam import IdTrie, TorchBackend, beam_search
from learner.data import build_examples
from learner.evaluate import trie_of
from learner.losses import pretrain_loss
from learner.model import GenerativeRecommender, ModelConfig
from learner.pretrain import PretrainResult, PretrainSettings, pretrain
from learner.tokenizer import UASIDTokenizer
from tests.learner.conftest import small_cfg


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["lazy_ar", "full_ar"])
def test_lower_layers_run_once_per_request_only_in_lazyar(
        mode: str, small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer, mode=mode)).eval()
    lower_calls = _count_calls(model.decoder.blocks[0])     # a lower block in lazy mode
    top_calls = _count_calls(model.decoder.blocks[-1])      # the top block (takes the token)
    enc_calls = _count_calls(model.encoder)
    ex = build_examples(synth_log.feedback[:40], small_tokenizer, history_len=10)
    b = ex.batch(list(range(5)))                             # 5 requests in one call
    trie, _ = trie_of(small_tokenizer)
    res = beam_search(TorchBackend(model), b.history, b.history_mask, b.context, trie, 8)
    T = small_tokenizer.config.id_len
    assert res.ids.shape == (5, 8, T)
    assert enc_calls[0] == 1
    assert top_calls[0] == T                                 # one step per level, all beams
    if mode == "lazy_ar":
        assert lower_calls[0] == 1                           # once, for all levels and beams
    else:
        assert lower_calls[0] == T                           # re-run at every step


def test_lazy_and_full_ar_share_one_parameter_layout(small_tokenizer: UASIDTokenizer) -> None:
    lazy = GenerativeRecommender(small_cfg(small_tokenizer, mode="lazy_ar"))
    full = GenerativeRecommender(small_cfg(small_tokenizer, mode="full_ar"))
    ls, fs = lazy.state_dict(), full.state_dict()
    assert {k: v.shape for k, v in ls.items()} == {k: v.shape for k, v in fs.items()}
    full.load_state_dict(ls)
    assert "items.table.weight" in ls and not any(k.startswith("encoder.items") for k in ls)


def test_decoder_step_agrees_with_teacher_forcing(small_tokenizer: UASIDTokenizer,
                                                  synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    for mode in ("lazy_ar", "full_ar"):
        model = GenerativeRecommender(small_cfg(small_tokenizer, mode=mode)).eval()
        ex = build_examples(synth_log.feedback[:30], small_tokenizer, history_len=10)
        b = ex.batch(ex.positives[:6])
        with torch.no_grad():
            _, mask, lower, kv = model.encode(b.history, b.history_mask, b.context)
            tf = model.decoder.teacher_forced(kv, mask, lower, b.target)      # [B, T, V]
            rows = torch.arange(len(b.target))
            for p in range(small_tokenizer.config.id_len):
                step = model.decoder.step(kv, mask, lower, rows, b.target[:, :p])  # [B, V]
                assert torch.allclose(step, tf[:, p], atol=1e-5)


def test_sequence_logprob_is_the_sum_of_level_logprobs(small_tokenizer: UASIDTokenizer,
                                                       synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer)).eval()
    ex = build_examples(synth_log.feedback[:30], small_tokenizer, history_len=10)
    b = ex.batch([0, 1, 2])
    _, arr = small_tokenizer.id_array()
    ids = torch.from_numpy(arr[:12]).reshape(3, 4, -1)
    per_level = model.level_logprob(b, ids)
    seq = model.sequence_logprob(b, ids)
    assert per_level.shape == (3, 4, small_tokenizer.config.id_len) and seq.shape == (3, 4)
    assert torch.allclose(seq, per_level.sum(-1))
    assert (per_level <= 0).all()
    # differentiable, for RSPO
    seq.sum().backward()
    assert model.items.table.weight.grad is not None


def test_prior_heads_behind_a_flag_route_training_and_mix_at_inference(
        small_tokenizer: UASIDTokenizer, synth_log: synthetic.SyntheticLog) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer, prior_heads=2, prior_horizons=1,
                                            prior_mix_mode="fixed", prior_mix=(0.7, 0.3)))
    ex = build_examples(synth_log.feedback[:60], small_tokenizer, history_len=10)
    b = ex.batch(ex.positives[:16])
    loss, parts = pretrain_loss(model, b)
    assert "prior" in parts and torch.isfinite(loss)
    loss.backward()
    assert model.decoder.priors[0].fc.weight.grad is not None
    with torch.no_grad():
        _, mask, lower, kv = model.encode(b.history, b.history_mask, b.context)
        logits = model.decoder.step(kv, mask, lower, None, b.target[:, :1])
    V1 = small_tokenizer.config.token_sizes[1]
    assert torch.allclose(torch.logsumexp(logits[:, :V1], -1), torch.zeros(16), atol=1e-4)
    plain = GenerativeRecommender(small_cfg(small_tokenizer))
    assert len(plain.decoder.priors) == 0


def test_lazyar_and_full_ar_both_learn_above_chance_recall(
        trained_lazy: PretrainResult, synth_log: synthetic.SyntheticLog, tmp_path,
        make_settings: Callable[..., PretrainSettings]) -> None:
    chance = 10 / len(trained_lazy.tokenizer)
    full = pretrain(make_settings(tmp_path / "full", mode="full_ar"), synth_log.ads,
                    synth_log.feedback)
    for result in (trained_lazy, full):
        assert result.metrics["recall@10"] > 3 * chance, result.metrics
        assert result.metrics["vndcg@10"] > 0
    assert full.model.cfg.mode == "full_ar" and trained_lazy.model.cfg.mode == "lazy_ar"


@pytest.mark.parametrize("prior_heads", [0, 2])  # 2: click/conversion × short/long-term
def test_level_logprob_matches_teacher_forced_log_softmax_per_row(
        prior_heads: int, small_tokenizer: UASIDTokenizer,
        synth_log: synthetic.SyntheticLog) -> None:
    """K ids per request share the request's memory keys/values (grouped rows) and each
    level is projected onto its own vocabulary: same values as one row per (request, id)
    through the padded teacher-forced logits."""
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer, prior_heads=prior_heads)).eval()
    ex = build_examples(synth_log.feedback[:30], small_tokenizer, history_len=10)
    b = ex.batch([0, 1, 2])
    _, arr = small_tokenizer.id_array()
    ids = torch.from_numpy(arr[:12]).reshape(3, 4, -1)
    with torch.no_grad():
        grouped = model.level_logprob(b, ids)                             # [3, 4, T]
        memory, mask, lower, kv = model.encode(b.history, b.history_mask, b.context)
        mix = model.prior_log_mix(memory, mask)                 # predicted, per request
        rows = torch.arange(3).repeat_interleave(4)
        flat = ids.reshape(12, -1)
        per_row = model.decoder.teacher_forced(kv[rows], mask[rows], lower[rows], flat,
                                               prior_log_mix=None if mix is None else mix[rows])
        expect = torch.log_softmax(per_row, -1).gather(-1, flat.unsqueeze(-1))[..., 0]
    assert torch.allclose(grouped.reshape(12, -1), expect, atol=1e-5)


@pytest.mark.parametrize("prior_heads", [0, 2])  # 2: click/conversion × short/long-term
def test_log_probs_under_the_trie_are_the_served_beam_scores(
        prior_heads: int, small_tokenizer: UASIDTokenizer,
        synth_log: synthetic.SyntheticLog) -> None:
    """With the servable trie, each level is renormalized over the children of the id's
    prefix: the log-probability the server's beam search adds at that level."""
    torch.manual_seed(1)
    model = GenerativeRecommender(small_cfg(small_tokenizer, prior_heads=prior_heads)).eval()
    ex = build_examples(synth_log.feedback[:30], small_tokenizer, history_len=10)
    b = ex.batch([0, 1])
    _, arr = small_tokenizer.id_array()
    servable = arr[::3]                                     # a third of the catalogue
    trie = IdTrie(servable, small_tokenizer.config.token_sizes)
    ids = torch.from_numpy(np.concatenate([servable[:3], arr[1:2]])).reshape(1, 4, -1)
    ids = ids.expand(2, -1, -1)                             # the last id is not servable
    allowed = torch.from_numpy(trie.allowed(ids.reshape(8, -1).numpy())).reshape(2, 4, *(
        ids.shape[2], -1))
    with torch.no_grad():
        got = model.level_logprob_and_memory(b, ids, allowed=allowed)[0]
        free = model.level_logprob(b, ids)
        memory, mask, lower, kv = model.encode(b.history, b.history_mask, b.context)
        mix = model.prior_log_mix(memory, mask)
        for r in range(2):
            for k in range(3):                              # served ids: the beam's scores
                for t in range(ids.shape[2]):
                    prefix = ids[r, k, :t].unsqueeze(0)
                    logits = model.decoder.step(kv, mask, lower, torch.tensor([r]), prefix,
                                                mix)[0]
                    kids = torch.from_numpy(trie.children[t][
                        _node(trie, ids[r, k, :t].tolist())].numpy() >= 0)
                    kids = torch.cat([kids, torch.zeros(logits.shape[0] - kids.shape[0],
                                                        dtype=torch.bool)])
                    want = logits[ids[r, k, t]] - logits[kids].logsumexp(0)
                    assert abs(float(got[r, k, t] - want)) < 1e-4
    assert bool((got[:, :3] >= free[:, :3] - 1e-6).all())  # fewer rivals, higher log-prob
    assert bool(torch.isfinite(got).all())                  # off the trie: still finite


def _node(trie: IdTrie, prefix: list[int]) -> int:
    node = 0
    for t, code in enumerate(prefix):
        node = int(trie.children[t][node, code])
    return node


def test_value_priors_shrink_rare_cells_to_their_goal_and_old_models_load_without_them(
        small_tokenizer: UASIDTokenizer) -> None:
    cfg = ModelConfig(level_sizes=small_tokenizer.config.token_sizes, d_model=32, n_head=4,
                      n_layer=2, n_top=1, n_enc_layer=1,
                      semantic_levels=small_tokenizer.config.semantic_levels,
                      value_factors=False)   # the prior alone (the memory below is fake)
    model = GenerativeRecommender(cfg)
    L = cfg.semantic_levels
    # 4000 impressions of (industry 1, goal 2) at CTR 0.10; 10 of (industry 3, goal 2), none
    # clicked; 2000 of (industry 1, goal 4) at CTR 0.01
    n = 6010
    slate = torch.zeros(n, 1, len(cfg.level_sizes), dtype=torch.long)
    slate[:4000, 0, L], slate[:4000, 0, L + 1] = 1, 2
    slate[4000:4010, 0, L], slate[4000:4010, 0, L + 1] = 3, 2
    slate[4010:, 0, L], slate[4010:, 0, L + 1] = 1, 4
    clicked = torch.zeros(n, 1)
    clicked[:400], clicked[4010:4030] = 1.0, 1.0
    rates = model.value.set_priors(slate, torch.ones(n, 1), clicked, torch.zeros(n, 1))
    assert abs(rates["prior_ctr"] - 420 / 6010) < 1e-3
    ctr = torch.sigmoid(model.value.prior_logit[0])
    assert abs(float(ctr[1, 2]) - 0.1) < 0.005          # plenty of evidence: its own rate
    assert abs(float(ctr[3, 2]) - float(ctr[1, 2])) < 0.01  # 10 unclicked: near its goal's
    assert float(ctr[1, 4]) < 0.02
    # the prior enters the value head's pCTR logit for candidates of that cell
    memory, mask = torch.zeros(1, 3, 32), torch.ones(1, 3)
    base = GenerativeRecommender(cfg)
    base.load_state_dict(model.state_dict())
    with torch.no_grad():
        p_with, _ = base.value(memory, mask, slate[None, :1, 0])
        base.value.prior_logit.zero_()
        p_without, _ = base.value(memory, mask, slate[None, :1, 0])
    assert abs(float(p_with - p_without) - float(model.value.prior_logit[0, 1, 2])) < 1e-5
    # a state dict saved before the priors existed loads, with no prior
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("prior_logit")}
    fresh = GenerativeRecommender(cfg)
    fresh.load_state_dict(old)
    assert float(fresh.value.prior_logit.abs().sum()) == 0.0
