"""GPR's HHD intent decoder in the model that is trained, exported and served: learned
intent queries decoded over the user rows into memory rows, before the task tokens,
once per request inside ``encoder.onnx``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from adloop.inprocess import InProcessServer
from learner import synthetic
from learner.beam import TorchBackend, beam_search
from learner.evaluate import trie_of
from learner.export import SPECS, graphs, max_abs_diff, ort_outputs, reference_inputs
from learner.export import torch_outputs as torch_refs
from learner.losses import value_loss, vsl_loss
from learner.model import GenerativeRecommender, IntentDecoder, ModelConfig
from learner.pretrain import PretrainResult, pretrain
from server.engine import RecRequest
from tests.learner.conftest import small_settings, tiny_inputs, tiny_model

RANKING = {"task_tokens": True, "fake_items": True, "ranker_kv": True}
N_INTENT = 4


def _user_rows(model: GenerativeRecommender) -> int:
    cfg = model.cfg
    return len(cfg.context_features) + cfg.history_len + cfg.organic_len


def test_the_intents_are_memory_rows_before_the_task_tokens() -> None:
    """memory = [user U | fake items F | intents I | T_interest, T_value]; the intents are
    visible to the generator and T_value still is not; ``replace`` keeps no user row."""
    off, on = tiny_model(**RANKING), tiny_model(intent_tokens=N_INTENT, **RANKING)
    rep = tiny_model(intent_tokens=N_INTENT, intent_mode="replace", **RANKING)
    x = tiny_inputs(on)
    U, F = _user_rows(on), on.cfg.level_sizes[0]
    with torch.no_grad():
        m_off = off.encode(*x[:3])[0]
        m_on, k_on, _, kv_on = on.encode(*x[:3])
        m_rep, k_rep = rep.encode(*x[:3])[:2]
    assert m_off.shape[1] == U + F + 2
    assert m_on.shape[1] == U + F + N_INTENT + 2 and kv_on.shape[4] == U + F + N_INTENT + 2
    assert m_rep.shape[1] == F + N_INTENT + 2
    assert torch.equal(k_on[:, U + F: U + F + N_INTENT], torch.ones(3, N_INTENT))
    assert (k_on[:, -1] == 0).all() and (k_on[:, -2] == 1).all()
    assert torch.equal(k_rep, torch.cat([torch.ones(3, F + N_INTENT + 1), torch.zeros(3, 1)], 1))


def test_the_intents_depend_only_on_the_user_rows() -> None:
    """Perturbing T_value, T_interest or the fake items leaves the intent rows as they
    were; perturbing the history moves them."""
    model = tiny_model(intent_tokens=N_INTENT, **RANKING)
    x = tiny_inputs(model)
    U, F = _user_rows(model), model.cfg.level_sizes[0]
    rows = slice(U + F, U + F + N_INTENT)
    with torch.no_grad():
        before = model.encode(*x[:3])[0][:, rows]
        model.encoder.task.add_(torch.randn_like(model.encoder.task))     # both task tokens
        model.encoder.fake.add_(torch.randn_like(model.encoder.fake))
        after = model.encode(*x[:3])[0][:, rows]
        hist = x[0].clone()
        hist[0, 0] = (hist[0, 0] + 1) % 3
        moved = model.encode(hist, *x[1:3])[0][:, rows]
    assert torch.equal(before, after)
    assert not torch.allclose(moved[0], before[0], atol=1e-4)
    assert torch.equal(moved[1:], before[1:])            # another request's intents: its own


@pytest.mark.parametrize("flags", [{}, RANKING])
def test_enabling_intents_leaves_every_other_row_unchanged(flags: dict[str, bool]) -> None:
    """Given the same weights, the user, fake item and task rows are those of the model
    without intents: the intent decoder only adds rows (and its own parameters)."""
    off, on = tiny_model(**flags), tiny_model(intent_tokens=N_INTENT, **flags)
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("encoder.intent.") for k in missing)
    x = tiny_inputs(on)
    U = _user_rows(on) + (on.cfg.level_sizes[0] if flags else 0)
    with torch.no_grad():
        m_off, k_off = off.encode(*x[:3])[:2]
        m_on, k_on = on.encode(*x[:3])[:2]
    tail = 2 if flags else 0
    assert torch.equal(m_on[:, :U], m_off[:, :U])
    assert torch.equal(m_on[:, m_on.shape[1] - tail:], m_off[:, U:])
    assert torch.equal(k_on[:, :U], k_off[:, :U])


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_the_vsl_and_value_losses_train_the_intent_decoder(mode: str) -> None:
    """The generator's logits and the ranker's scores read the intents: the VSL loss and
    the value loss each reach the intent queries and every intent block."""
    model = tiny_model(intent_tokens=N_INTENT, intent_mode=mode, n_intent_layer=2,
                   task_tokens=True).train()
    hist, mask, ctx, target, cands = tiny_inputs(model)
    intent = model.encoder.intent
    assert isinstance(intent, IntentDecoder)
    out = model(hist, mask, ctx, target)
    vsl_loss(out["logits"], target, torch.ones(3)).backward()
    assert intent.intent_query.grad is not None and intent.intent_query.grad.abs().sum() > 0
    for blk in intent.blocks:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())
    model.zero_grad()
    mem, mmask = model.encoder(hist, mask, ctx)
    pctr, pcvr = model.value(mem, mmask, cands)
    value_loss(pctr, pcvr, torch.ones(3, 4), torch.zeros(3, 4), torch.ones(3, 4)).backward()
    assert intent.intent_query.grad is not None and intent.intent_query.grad.abs().sum() > 0


def test_the_generators_logits_move_with_the_intent_queries() -> None:
    model = tiny_model(intent_tokens=N_INTENT)
    hist, mask, ctx, target, _ = tiny_inputs(model)
    with torch.no_grad():
        before = model(hist, mask, ctx, target)["logits"]
        assert model.encoder.intent is not None
        q = model.encoder.intent.intent_query
        q.add_(torch.randn_like(q))
        after = model(hist, mask, ctx, target)["logits"]
    assert (after - before).abs().max() > 1e-3


def _with_history(model: GenerativeRecommender, ids: np.ndarray, seed: int, B: int,
                  H: int) -> dict[str, dict[str, np.ndarray]]:
    """:func:`reference_inputs` with a history of H <= history_len rows: the step's and
    the ranker's inputs recomputed from the shorter encoding."""
    inputs = reference_inputs(model, ids, seed=seed, B=B)
    enc = inputs["encoder.onnx"]
    enc["history"], enc["history_mask"] = enc["history"][:, :H], enc["history_mask"][:, :H]
    with torch.no_grad():
        memory, mmask, lower, kv = (t.numpy() for t in model.encode(
            *(torch.from_numpy(v) for v in enc.values())))
    inputs["decoder_step.onnx"].update(memory_kv=kv, memory_mask=mmask, lower=lower)
    inputs["value.onnx"].update(memory=memory, memory_mask=mmask, memory_kv=kv)
    return inputs


@pytest.mark.parametrize("flags", [
    {"intent_tokens": N_INTENT},
    {"intent_tokens": N_INTENT, **RANKING},
    {"intent_tokens": N_INTENT, "n_intent_layer": 2, "intent_mode": "replace", **RANKING},
])
def test_onnx_parity_with_intents(flags: dict[str, Any]) -> None:
    """The three graphs reproduce torch within 1e-4, at other batch sizes and history
    lengths than exported; the intent decoder is in encoder.onnx and not in the step."""
    model = tiny_model(**flags)
    ids = np.random.default_rng(0).integers(0, 3, (30, model.cfg.id_len))
    H = model.cfg.history_len
    with tempfile.TemporaryDirectory() as d:
        for B, seed, h in ((2, 0, H), (5, 1, H), (3, 2, H - 3)):
            inputs = _with_history(model, ids, seed, B, h)
            if h == H:
                for name, g in graphs(model).items():
                    i, o, axes = SPECS[name]
                    torch.onnx.export(g, tuple(torch.from_numpy(v)
                                               for v in inputs[name].values()),
                                      str(Path(d) / name), input_names=i, output_names=o,
                                      dynamic_axes=axes, opset_version=17, dynamo=False)
            diffs = max_abs_diff(torch_refs(model, inputs), ort_outputs(Path(d), inputs))
            assert max(diffs.values()) <= 1e-4, diffs
        assert inputs["decoder_step.onnx"]["memory_kv"].shape[4] == \
            inputs["value.onnx"]["memory"].shape[1]
        # the same model without the intent decoder: its step graph is the same size, its
        # encoder graph smaller by the intent decoder's weights
        plain = tiny_model(**{k: v for k, v in flags.items() if not k.startswith("intent")
                          and k != "n_intent_layer"})
        plain.load_state_dict(model.state_dict(), strict=False)
        inputs = _with_history(plain, ids, 0, 2, H)
        for name, g in graphs(plain).items():
            i, o, axes = SPECS[name]
            torch.onnx.export(g, tuple(torch.from_numpy(v) for v in inputs[name].values()),
                              str(Path(d) / f"plain-{name}"), input_names=i, output_names=o,
                              dynamic_axes=axes, opset_version=17, dynamo=False)

        def weights(name: str) -> int:
            graph = onnx.load(str(Path(d) / name)).graph
            return sum(int(np.prod(t.dims)) for t in graph.initializer)

        assert weights("decoder_step.onnx") == weights("plain-decoder_step.onnx")
        assert weights("value.onnx") == weights("plain-value.onnx")
        assert weights("encoder.onnx") > weights("plain-encoder.onnx")


def test_an_old_checkpoint_config_loads_with_intents_off() -> None:
    model = tiny_model()
    d = model.cfg.to_json()
    for k in ("intent_tokens", "n_intent_layer", "intent_mode"):
        d.pop(k)
    cfg = ModelConfig.from_json(d)
    assert cfg.intent_tokens == 0
    old = GenerativeRecommender(cfg)
    assert old.encoder.intent is None
    old.load_state_dict(model.state_dict())               # strict: same parameters
    new = tiny_model(intent_tokens=N_INTENT).cfg.to_json()
    assert ModelConfig.from_json(new).intent_tokens == N_INTENT
    with pytest.raises(ValueError):
        ModelConfig(level_sizes=(4, 4), intent_tokens=2, intent_mode="compress")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[PretrainResult,
                                                               synthetic.SyntheticLog]:
    log = synthetic.generate(n_ads=50, n_users=30, n_requests=400, n_categories=4, seed=5)
    run = tmp_path_factory.mktemp("hhd") / "run"
    res = pretrain(small_settings(run, steps=20, intent_tokens=N_INTENT, n_intent_layer=2,
                                  **RANKING), log.ads, log.feedback)
    return res, log


def test_beam_search_runs_the_intent_decoder_once_per_request_batch(
        trained: tuple[PretrainResult, synthetic.SyntheticLog]) -> None:
    """The LazyAR speed-up is kept: decoding steps take the encoder's per-request states
    (intents included) and never re-run the intent decoder, whatever the beam width."""
    res = trained[0]
    assert res.model.cfg.intent_tokens == N_INTENT and res.model.cfg.n_intent_layer == 2
    intent = res.model.encoder.intent
    assert intent is not None
    calls: list[int] = []
    handle = intent.register_forward_hook(lambda m, i, o: calls.append(int(o.shape[0])))
    trie, _ = trie_of(res.tokenizer)
    cfg = res.model.cfg
    B = 3
    hist = torch.zeros(B, cfg.history_len, cfg.id_len, dtype=torch.long)
    ctx = torch.randint(1, 50, (B, len(cfg.context_features) + cfg.organic_len))
    try:
        for width in (4, 16):
            calls.clear()
            beam_search(TorchBackend(res.model), hist, torch.zeros(B, cfg.history_len), ctx,
                        trie, width)
            assert calls == [B]                            # one call, B requests in it
    finally:
        handle.remove()


def test_a_snapshot_with_intents_is_served(
        trained: tuple[PretrainResult, synthetic.SyntheticLog], tmp_path: Path) -> None:
    res, log = trained
    srv = InProcessServer(tmp_path / "serve", threads=1)
    srv.sync_catalog(log.ads)
    assert srv.publish(res.model, res.tokenizer) == "v000001"
    import json

    man = json.loads((srv.store / "v000001" / "manifest.json").read_text())
    assert man["intent_decoder"] == {"tokens": N_INTENT, "layers": 2, "mode": "append"}
    out = srv.rank([RecRequest("u1", {}, [log.ads[0].ad_id], 5)], lambda levels, k: [16] * levels)
    ranked = out[0].ads
    assert len(ranked) == 5 and all(0.0 < a.pctr < 1.0 for a in ranked)
    srv.close()
