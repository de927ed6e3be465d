"""OneRanker's ranking side in the model that is trained, exported and served: task
tokens, Fake Item Tokens, the ranking decoder's KV pass-through and the DC loss."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from adloop.inprocess import InProcessServer
from learner import synthetic
from learner.export import SPECS, graphs, max_abs_diff, ort_outputs, reference_inputs
from learner.export import torch_outputs as torch_refs
from learner.losses import dc_loss, value_loss
from learner.model import GenerativeRecommender
from learner.pretrain import pretrain
from server.engine import RecRequest
from tests.learner.conftest import small_settings, tiny_inputs, tiny_model

ALL = {"task_tokens": True, "fake_items": True, "ranker_kv": True}


def _generator_out(model: GenerativeRecommender, x: tuple[torch.Tensor, ...]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    hist, mask, ctx, target, _ = x
    B, n_mtp = hist.shape[0], model.cfg.mtp_heads
    future = target.unsqueeze(1).expand(B, n_mtp, -1).flip(-1).clamp(max=2)
    with torch.no_grad():   # MTP through the decoder, as pretraining runs it
        out = model(hist, mask, ctx, target, None, future, torch.ones(B, n_mtp))
    return out["logits"], out["mtp"]


def test_the_value_task_token_never_changes_the_interest_side() -> None:
    """Causal mask between task tokens: T_value sees T_interest, not the reverse, and the
    generator does not see T_value, so T_value's weights move the ranker only."""
    model = tiny_model(task_tokens=True)
    x = tiny_inputs(model)
    logits, mtp = _generator_out(model, x)
    with torch.no_grad():
        mem, mmask, _, _ = model.encode(*x[:3])
        before = model.value(mem, mmask, x[4])[0]
        model.encoder.task[1].add_(torch.randn_like(model.encoder.task[1]))     # T_value
        mem2, _, _, _ = model.encode(*x[:3])
        after = model.value(mem2, mmask, x[4])[0]
    logits2, mtp2 = _generator_out(model, x)
    assert torch.equal(logits, logits2) and torch.equal(mtp, mtp2)
    assert torch.equal(mem[:, :-1], mem2[:, :-1])         # every other token unchanged
    assert not torch.allclose(before, after)              # the ranker reads T_value
    assert (mmask[:, -1] == 0).all() and (mmask[:, -2] == 1).all()

    with torch.no_grad():                                  # T_interest feeds both sides
        model.encoder.task[0].add_(torch.randn_like(model.encoder.task[0]))
        mem3, _, _, _ = model.encode(*x[:3])
        after3 = model.value(mem3, mmask, x[4])[0]
    logits3, _ = _generator_out(model, x)
    assert not torch.allclose(logits, logits3) and not torch.allclose(after, after3)


def test_user_tokens_are_encoded_as_without_fake_items_and_task_tokens() -> None:
    """Extras come after the user sequence in the group order: the user tokens' states
    do not depend on them (the extras read the user, not the reverse)."""
    plain, extra = tiny_model(), tiny_model(task_tokens=True, fake_items=True)
    extra.load_state_dict(plain.state_dict(), strict=False)
    x = tiny_inputs(plain)
    with torch.no_grad():
        m0, mask0, _, _ = plain.encode(*x[:3])
        m1, mask1, _, _ = extra.encode(*x[:3])
    U = m0.shape[1]
    assert m1.shape[1] == U + plain.cfg.level_sizes[0] + 2
    assert torch.allclose(m0, m1[:, :U], atol=1e-6) and torch.equal(mask0, mask1[:, :U])


def test_fake_item_tokens_are_one_per_level0_code_and_inform_generation() -> None:
    model = tiny_model(fake_items=True)
    x = tiny_inputs(model)
    assert model.encoder.fake.shape == (model.cfg.level_sizes[0], model.cfg.d_model)
    logits, _ = _generator_out(model, x)
    with torch.no_grad():    # the token of code 2 is the item table's level-0 row + offset
        model.items.table.weight[2].add_(1.0)
    logits2, _ = _generator_out(model, x)
    assert not torch.allclose(logits, logits2)


def test_the_ranker_reads_the_generators_cached_keys_and_values() -> None:
    # the ranking decoder alone (the factorised terms read the memory's user rows)
    model = tiny_model(ranker_kv=True, value_factors=False)
    x = tiny_inputs(model)
    assert not any(".attn_c.kv." in n for n, _ in model.value.named_parameters())
    with torch.no_grad():
        mem, mmask, _, kv = model.encode(*x[:3])
        own = model.value(mem, mmask, x[4])[0]
        passed = model.value(mem, mmask, x[4], kv)[0]
        assert torch.allclose(own, passed, atol=1e-6)      # same tensors as the cache
        # the memory itself is not read: only the cached keys/values are
        unchanged = model.value(torch.randn_like(mem), mmask, x[4], kv)[0]
        moved = model.value(mem, mmask, x[4], kv * 1.5)[0]
    assert torch.equal(passed, unchanged) and not torch.allclose(passed, moved)

    model.train()                                          # read-only for the value loss
    mem, mmask, _, kv = model.encode(*x[:3])
    pctr, pcvr = model.value(mem, mmask, x[4], kv)
    value_loss(pctr, pcvr, torch.ones(3, 4), torch.zeros(3, 4), torch.ones(3, 4)).backward()
    top = model.decoder.blocks[model.decoder.start]
    assert top.attn_c is not None and top.attn_c.kv.weight.grad is None
    assert model.value.out.weight.grad is not None


@pytest.mark.parametrize("flags", [{}, ALL, {**ALL, "mode": "full_ar"}],
                         ids=["base", "all", "all-full-ar"])
def test_onnx_parity_with_the_ranking_side(flags: dict[str, object]) -> None:
    model = tiny_model(**flags)  # type: ignore[arg-type]
    ids = np.random.default_rng(0).integers(0, 3, (30, model.cfg.id_len))
    with tempfile.TemporaryDirectory() as d:
        for B, seed in ((2, 0), (5, 1)):
            inputs = reference_inputs(model, ids, seed=seed, B=B)
            for name, g in graphs(model).items():
                i, o, axes = SPECS[name]
                torch.onnx.export(g, tuple(torch.from_numpy(v) for v in inputs[name].values()),
                                  str(Path(d) / name), input_names=i, output_names=o,
                                  dynamic_axes=axes, opset_version=17, dynamo=False)
            diffs = max_abs_diff(torch_refs(model, inputs), ort_outputs(Path(d), inputs))
            assert max(diffs.values()) <= 1e-4, diffs
        import onnx

        declared = {i.name for i in onnx.load(str(Path(d) / "value.onnx")).graph.input}
    assert ("memory_kv" in declared) == bool(flags.get("ranker_kv"))


def test_dc_loss_is_a_kl_towards_the_rankers_softmax_with_the_ranker_as_teacher() -> None:
    rank = torch.tensor([[2.0, 0.0, -1.0, 5.0], [1.0, 3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])   # row 2: one item
    tau = 0.5
    p = torch.softmax(rank[0, :3].detach() / tau, 0)
    aligned = torch.zeros(2, 4)
    aligned[0, :3] = p.log()
    assert float(dc_loss(aligned, rank, mask, tau)) == pytest.approx(0.0, abs=1e-6)
    gen = torch.zeros(2, 4, requires_grad=True)
    loss = dc_loss(gen, rank, mask, tau)
    expected = float((p * (p.log() - torch.log(torch.full((3,), 1 / 3)))).sum())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert rank.grad is None                               # stop-gradient: ranker side
    assert gen.grad is not None
    assert gen.grad[0, 0] < 0 < gen.grad[0, 2]             # raise the ranker's favourite
    assert torch.equal(gen.grad[1], torch.zeros(4)) and gen.grad[0, 3] == 0


def test_a_snapshot_with_the_whole_ranking_side_is_served(tmp_path: Path) -> None:
    log = synthetic.generate(n_ads=50, n_users=30, n_requests=400, n_categories=4, seed=5)
    res = pretrain(small_settings(tmp_path / "run", steps=20, dc_weight=0.5, **ALL),
                   log.ads, log.feedback)
    assert res.model.cfg.task_tokens and res.model.cfg.ranker_kv
    srv = InProcessServer(tmp_path / "serve", threads=1)
    srv.sync_catalog(log.ads)
    assert srv.publish(res.model, res.tokenizer) == "v000001"
    out = srv.rank([RecRequest("u1", {}, [log.ads[0].ad_id], 5)], lambda levels, k: [16] * levels)
    ranked = out[0].ads
    assert len(ranked) == 5 and all(0.0 < a.pctr < 1.0 for a in ranked)
    values = [a.expected_value for a in ranked if a.propensity == 1.0]   # not explored
    assert values == sorted(values, reverse=True)
    srv.close()
