"""The value model's factorised terms, its value-only fitting stage and its calibration:
a per-item bias shrunk to the (industry, goal) cell prior, wide crossed terms read from
the request's raw ids, held-out early stopping, a Platt map fitted on held-out logs and
carried by value.onnx."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch

from learner import synthetic
from learner.data import ExampleSet, build_examples, split_by_time
from learner.export import export_snapshot, ort_outputs, reference_inputs, torch_outputs
from learner.losses import value_loss
from learner.model import POSITIONS, GenerativeRecommender
from learner.rspo import RSPOConfig
from learner.rspo_step import OnlineLearner
from learner.tokenizer import UASIDTokenizer
from learner.topic_match import ad_topic, fill_topic_match
from learner.value_fit import (
    Design,
    Impressions,
    OnlineLinear,
    calibrate,
    ece,
    finetune_value,
    fit_linear,
    shown_slates,
    value_metrics,
)
from server.runtime import ModelRuntime, resolve_provider
from streams.schemas import Feedback, FeedbackItem
from tests.learner.conftest import small_cfg, tiny_inputs, tiny_model


def _fit_value_head(model: GenerativeRecommender, cands: torch.Tensor, clicked: torch.Tensor,
                    steps: int = 150) -> None:
    """Steps of the per-item biases alone on one fixed batch (BCE + their prior)."""
    hist, mask, ctx, _, _ = tiny_inputs(model, B=cands.shape[0])
    memory, mmask = model.encoder(hist, mask, ctx)
    memory, mmask = memory.detach(), mmask.detach()
    opt = torch.optim.Adam([model.value.item_bias], lr=0.05)
    smask = torch.ones(clicked.shape)
    for _ in range(steps):
        pctr, pcvr = model.value(memory, mmask, cands)
        loss = value_loss(pctr, pcvr, clicked, torch.zeros_like(clicked), smask) \
            + model.value.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_an_item_without_data_keeps_the_cell_prior_and_the_bias_prior_shrinks_the_others(
        ) -> None:
    biases = []
    for strength in (1e-4, 1e-1):
        model = tiny_model(seed=3)
        head = model.value
        head.bias_l2.fill_(strength)
        seen = torch.tensor([1, 2, 0, 1, 2, 0])             # one item id, every request
        unseen = torch.tensor([2, 0, 1, 0, 1, 1])
        cands = seen.expand(3, 4, -1).clone()
        _fit_value_head(model, cands, torch.ones(3, 4))      # always clicked
        rows = head.bucket(torch.stack([seen, unseen]))
        assert rows[0] != rows[1]
        assert torch.equal(head.item_bias[rows[1]], torch.zeros(2))  # no data: no bias
        bias = float(head.item_bias[rows[0], 0].detach())
        assert bias > 0.05                                   # data: clicked -> up
        biases.append(bias)
    assert biases[1] < 0.5 * biases[0]                       # stronger prior, nearer 0


def test_the_per_item_bias_row_is_a_function_of_the_full_id_only() -> None:
    head = tiny_model().value
    ids = torch.tensor([[[1, 2, 0, 1, 2, 0], [1, 2, 0, 1, 2, 1], [1, 2, 0, 1, 2, 0]]])
    rows = head.bucket(ids)
    assert rows[0, 0] == rows[0, 2] and rows[0, 0] != rows[0, 1]
    assert int(rows.min()) >= 0 and int(rows.max()) < head.item_bias.shape[0]


def _random_slates_log(tok: UASIDTokenizer, ads: list, n_requests: int, seed: int,
                       device_of: Callable[[int], str],
                       rate: Callable[[Any, str], float]) -> list[Feedback]:
    """Random slates of 5, request ``r`` on device ``device_of(r)``, each ad clicked at
    ``rate(ad, device)`` and a click converting at 0.3."""
    rng = np.random.default_rng(seed)
    out = []
    for r in range(n_requests):
        device = device_of(r)
        items = []
        for pos, i in enumerate(rng.choice(len(ads), 5, replace=False).tolist()):
            a = ads[i]
            clicked = bool(rng.random() < rate(a, device))
            items.append(FeedbackItem(
                ad_id=a.ad_id, semantic_id=list(tok.ids_of(a.ad_id)), position=pos,
                score=0.0, bid=a.bid, bid_type=a.bid_type, clicked=clicked,
                converted=clicked and bool(rng.random() < 0.3), reward=float(clicked)))
        t = 1000.0 + 30.0 * r
        out.append(Feedback(request_id=f"r{r}", user_id=f"u{r % 50}", kind="final",
                            revision=0, impression_time=t, event_time=t + 60, elapsed_s=60,
                            window_closed=True, context={"device": device}, items=items))
    return out


def _known_rate_log(tok: UASIDTokenizer, ads: list, n_requests: int = 3000,
                    seed: int = 0) -> tuple[list[Feedback], dict[str, float]]:
    """Random slates of 5 with a known click rate per industry (no user effect)."""
    industries = sorted({a.industry for a in ads})
    rate_of = {ind: 0.02 + 0.25 * i / max(1, len(industries) - 1)
               for i, ind in enumerate(industries)}
    ctr = {a.ad_id: rate_of[a.industry] for a in ads}
    return _random_slates_log(tok, ads, n_requests, seed, lambda r: "ios",
                              lambda a, _device: ctr[a.ad_id]), ctr


def _model_on(fb: list[Feedback], tok: UASIDTokenizer, held_frac: float, **cfg: Any
              ) -> tuple[GenerativeRecommender, ExampleSet, ExampleSet]:
    """A fresh small model on ``fb``'s examples split by time, its cell priors set from
    the earlier part: (model, train, held)."""
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(tok, **cfg)).eval()
    ex = build_examples(fb, tok, model.cfg.history_len, model.cfg.context_features,
                        model.cfg.context_buckets, 0, organic_len=model.cfg.organic_len)
    train, held = split_by_time(ex, held_frac)
    shown = shown_slates(train).batch()
    model.value.set_priors(shown.slate, shown.slate_mask, shown.clicked, shown.converted)
    return model, train, held


def test_platt_calibration_fitted_on_held_out_logs_removes_a_shift_and_travels_in_the_graph(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer,
        tmp_path: Path) -> None:
    fb, ctr = _known_rate_log(small_tokenizer, synth_log.ads)
    model, _, held = _model_on(fb, small_tokenizer, 0.3)
    model.value.out.weight.data.zero_()       # the decoder adds nothing: logits = prior
    model.value.prior_logit[0] += 1.2         # a miscalibrated model (pCTR ~3x too high)

    def ece_vs_truth() -> float:
        s = shown_slates(held)
        b = s.batch()
        memory, mask = model.encoder(b.history, b.history_mask, b.context)
        p = torch.sigmoid(model.value(memory, mask, b.slate)[0])[b.slate_mask > 0]
        ids = b.slate[b.slate_mask > 0]
        by_id = {tuple(small_tokenizer.ids_of(a)): r for a, r in ctr.items()}
        truth = np.array([by_id[tuple(i)] for i in ids.tolist()])
        return ece(p.detach().double().numpy(), truth)

    before = ece_vs_truth()
    fitted = calibrate(model, held)
    after = ece_vs_truth()
    assert before > 0.05
    assert after < 0.02
    assert fitted["calibration_ctr_shift"] < -0.5
    m = value_metrics(model, held)
    assert m["value_ece_ctr"] < 0.03 and np.isfinite(m["value_logloss_cvr"])
    # the calibrated head is what value.onnx computes
    export_snapshot(model, small_tokenizer, tmp_path / "snap", version="v1")
    inputs = reference_inputs(model, small_tokenizer.id_array()[1])
    ours, onnx = torch_outputs(model, inputs), ort_outputs(tmp_path / "snap", inputs)
    for name in ours["value.onnx"]:
        np.testing.assert_allclose(onnx["value.onnx"][name], ours["value.onnx"][name],
                                   atol=1e-4)


def test_a_shift_only_calibration_moves_the_base_rate_and_keeps_the_spread_between_ads(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb, _ = _known_rate_log(small_tokenizer, synth_log.ads)
    model, _, held = _model_on(fb, small_tokenizer, 0.3)
    model.value.out.weight.data.zero_()
    model.value.prior_logit[0] += 1.2         # pCTR ~3x too high everywhere
    shift = calibrate(model, held, fit_scale=False)
    assert shift["calibration_ctr_scale"] == 1.0
    assert shift["calibration_ctr_shift"] < -0.5
    with_scale = calibrate(model, held)       # the full Platt map may flatten or stretch
    assert with_scale["calibration_ctr_scale"] != 1.0
    assert abs(with_scale["calibration_ctr_shift"] - shift["calibration_ctr_shift"]) < 1.0


def test_value_only_epochs_pick_their_count_on_a_time_split_and_leave_the_generator(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer)).eval()
    ex = build_examples(synth_log.feedback, small_tokenizer, model.cfg.history_len,
                        model.cfg.context_features, model.cfg.context_buckets, 0,
                        organic_len=model.cfg.organic_len)
    train, held = split_by_time(ex, 0.2)
    before_gen = {k: v.clone() for k, v in model.state_dict().items()
                  if not k.startswith("value.")}
    start = value_metrics(model, held)
    out = finetune_value(model, train, val_frac=0.2, epochs=6, patience=2, lr=1e-2)
    end = value_metrics(model, held)
    assert 1 <= out["value_best_epoch"] <= out["value_epochs"] <= 6
    assert end["value_logloss_joint"] < start["value_logloss_joint"]   # the later logs too
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before_gen.items())
    assert all(p.requires_grad for p in model.parameters())
    # the head is the refit on all of train for e* epochs: running it again gives it
    torch.manual_seed(0)
    again = GenerativeRecommender(small_cfg(small_tokenizer)).eval()
    finetune_value(again, train, val_frac=0.2, epochs=6, patience=2, lr=1e-2)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_wide_terms_add_each_present_context_value_and_topic_share_to_its_cells() -> None:
    model = tiny_model(seed=4, value_wide=True)
    head = model.value
    hist, mask, _, _, _ = tiny_inputs(model, B=1)
    C, n_topic = len(model.cfg.context_features), model.cfg.organic_len
    ctx = torch.zeros(1, C + n_topic, dtype=torch.long)
    ctx[0, 0] = 5                                  # one context value present
    ctx[0, C:C + 3] = torch.tensor([7, 7, 9])      # organic topics: shares 2/5 and 1/5
    L = model.cfg.semantic_levels
    a = torch.tensor([1, 2, 0, 1, 2, 0])           # industry 1, level-0 code 1
    b = torch.tensor([2, 0, 1, 3, 0, 0])           # industry 3, level-0 code 2
    cands = torch.stack([a, b])[None]
    memory, mmask = model.encoder(hist, mask, ctx)
    with pytest.raises(ValueError, match="context"):
        head(memory, mmask, cands)
    ctr0, cvr0 = head(memory, mmask, cands, context=ctx)
    n_ind = head.wide_cells[0]
    width = sum(head.wide_cells)
    with torch.no_grad():
        head.wide_context[5 * width + int(a[L]), 0] = 1.0          # (value 5, industry 1)
        head.wide_topic[7 * width + n_ind + int(b[0]), 0] = 1.0    # (topic 7, code 2)
        head.wide_topic[9 * width + int(b[L]), 1] = 2.0            # pCVR: (topic 9, ind 3)
        head.wide_context[0 * width + int(b[L]), 0] = 5.0          # id 0 = absent: nothing
    ctr, cvr = head(memory, mmask, cands, context=ctx)
    torch.testing.assert_close(ctr - ctr0, torch.tensor([[1.0, 0.4]]))
    torch.testing.assert_close(cvr - cvr0, torch.tensor([[0.0, 0.4]]))


def test_the_goal_cell_adds_a_base_rate_per_goal_and_per_context_value() -> None:
    model = tiny_model(seed=4, value_wide=True, value_wide_goal=True)
    head = model.value
    hist, mask, _, _, _ = tiny_inputs(model, B=1)
    C, n_topic = len(model.cfg.context_features), model.cfg.organic_len
    ctx = torch.zeros(1, C + n_topic, dtype=torch.long)
    ctx[0, 0] = 5
    L = model.cfg.semantic_levels
    a = torch.tensor([1, 2, 0, 1, 2, 0])           # goal 2
    b = torch.tensor([2, 0, 1, 3, 1, 0])           # goal 1
    cands = torch.stack([a, b])[None]
    memory, mmask = model.encoder(hist, mask, ctx)
    ctr0, cvr0 = head(memory, mmask, cands, context=ctx)
    n_ind, n_c0, n_goal = head.wide_cells
    assert n_goal == model.cfg.level_sizes[L + 1]
    width = n_ind + n_c0 + n_goal
    with torch.no_grad():
        head.wide_item[n_ind + n_c0 + int(a[L + 1]), 1] = 0.5           # pCVR of goal 2
        head.wide_context[5 * width + n_ind + n_c0 + int(b[L + 1]), 0] = 0.3   # (5, goal 1)
    ctr, cvr = head(memory, mmask, cands, context=ctx)
    torch.testing.assert_close(ctr - ctr0, torch.tensor([[0.0, 0.3]]))
    torch.testing.assert_close(cvr - cvr0, torch.tensor([[0.5, 0.0]]))


def test_a_wide_value_graph_takes_the_context_ids_and_matches_torch(
        small_tokenizer: UASIDTokenizer, tmp_path: Path) -> None:
    import onnxruntime as ort

    match = {k: v for k, v in _match_cfg(small_tokenizer).items() if k != "value_wide"}
    for wide, goal, topic, share in ((False, False, False, False), (True, False, False, False),
                                     (True, True, False, False), (True, False, True, False),
                                     (True, False, True, True)):
        torch.manual_seed(0)
        model = GenerativeRecommender(small_cfg(
            small_tokenizer, value_wide=wide, value_wide_goal=goal,
            value_share_interest=share, **(match if topic else {}))).eval()
        if share:
            model.value.interest_share.fill_(0.7)
        if wide:
            with torch.no_grad():
                model.value.wide_context.normal_(0.0, 0.5)
                model.value.wide_topic.normal_(0.0, 0.5)
        if topic:
            _random_match_tables(model)
        out = tmp_path / f"snap-{wide}-{goal}-{topic}-{share}"
        export_snapshot(model, small_tokenizer, out, version="v1")
        sess = ort.InferenceSession(str(out / "value.onnx"), providers=["CPUExecutionProvider"])
        assert ("context" in {i.name for i in sess.get_inputs()}) == wide
        inputs = reference_inputs(model, small_tokenizer.id_array()[1])
        ours, onnx = torch_outputs(model, inputs), ort_outputs(out, inputs)
        for name in ours["value.onnx"]:
            np.testing.assert_allclose(onnx["value.onnx"][name], ours["value.onnx"][name],
                                       atol=1e-4)
        # the server's runtime feeds the encoder's context rows to the value graph
        enc = inputs["encoder.onnx"]
        rt = ModelRuntime(out, resolve_provider("cpu"))
        states = rt.encode(enc["history"], enc["history_mask"], enc["context"])
        pctr, _ = rt.value(states, inputs["value.onnx"]["candidates"])
        np.testing.assert_allclose(pctr, ours["value.onnx"]["pctr"], atol=1e-4)
        rows = np.array([1])
        pctr_row, _ = rt.value(states, inputs["value.onnx"]["candidates"][rows], rows=rows)
        np.testing.assert_allclose(pctr_row, ours["value.onnx"]["pctr"][rows], atol=1e-4)


def _crossed_rate_log(tok: UASIDTokenizer, ads: list, n_requests: int = 1500,
                      seed: int = 0) -> list[Feedback]:
    """Random slates of 5 whose click rate is a device × industry cross: on ``ios`` the
    first half of the industries is clicked at 0.3 and the rest at 0.02, on ``android``
    the other way round (every industry's mean rate is the same)."""
    industries = sorted({a.industry for a in ads})
    first = set(industries[: len(industries) // 2])
    return _random_slates_log(
        tok, ads, n_requests, seed, lambda r: "ios" if r % 2 else "android",
        lambda a, device: 0.3 if (a.industry in first) == (device == "ios") else 0.02)


def test_the_linear_fit_learns_a_context_cross_the_prior_cannot_hold(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _crossed_rate_log(small_tokenizer, synth_log.ads)
    model, train, held = _model_on(fb, small_tokenizer, 0.2, value_wide=True)
    before = value_metrics(model, held)
    out = fit_linear(model, train, val_frac=0.2, scales=(1.0, 3.0))
    after = value_metrics(model, held)
    assert out["value_linear_l2_scale"] in (1.0, 3.0)
    assert after["value_logloss_ctr"] < before["value_logloss_ctr"] - 0.05
    assert after["value_ece_ctr"] < 0.05      # against outcomes: ~0.02 of it is noise
    # the cross itself: an ad of the first industry, on each device
    ad = sorted(synth_log.ads, key=lambda a: a.industry)[0]
    cand = torch.tensor([[small_tokenizer.ids_of(ad.ad_id)]])
    held_shown = shown_slates(held)
    b = held_shown.batch()
    probs = {}
    for device in ("ios", "android"):
        i = next(j for j, r in enumerate(held_shown.request.tolist())
                 if fb[r].context["device"] == device)
        memory, mask = model.encoder(b.history[i:i + 1], b.history_mask[i:i + 1],
                                     b.context[i:i + 1])
        ctr, _ = model.value(memory, mask, cand, context=b.context[i:i + 1])
        probs[device] = float(torch.sigmoid(ctr).detach())
    assert probs["ios"] > 0.2 and probs["android"] < 0.06


def test_the_linear_fit_serves_the_linear_terms_alone_unless_asked_to_try_the_deep_part(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _crossed_rate_log(small_tokenizer, synth_log.ads, n_requests=600)
    model, train, _ = _model_on(fb, small_tokenizer, 0.2, value_wide=True)
    head = model.value
    assert head.out.weight.abs().sum() > 0
    out = fit_linear(model, train, val_frac=0.2, scales=(1.0,))
    assert out["value_linear_deep"] == 0.0 and float(head.linear_fit[1]) == 0.0
    for param in head.deep_output_parameters():
        assert not param.any()
    # with the variant the split chooses: the flag the online refits read follows it
    model, train, _ = _model_on(fb, small_tokenizer, 0.2, value_wide=True)
    out = fit_linear(model, train, val_frac=0.2, scales=(1.0,), try_deep=True)
    assert float(model.value.linear_fit[1]) == out["value_linear_deep"]
    if out["value_linear_deep"]:
        assert model.value.out.weight.abs().sum() > 0


def _linear_fitted_model(fb: list[Feedback], tok: UASIDTokenizer, **cfg: Any
                         ) -> tuple[GenerativeRecommender, ExampleSet]:
    """A wide model with priors set and its linear terms fitted on ``fb`` (deep part
    zeroed, as pretraining leaves it)."""
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(tok, value_wide=True, **cfg)).eval()
    ex = build_examples(fb, tok, model.cfg.history_len, model.cfg.context_features,
                        model.cfg.context_buckets, 0, organic_len=model.cfg.organic_len)
    shown = shown_slates(ex).batch()
    model.value.set_priors(shown.slate, shown.slate_mask, shown.clicked, shown.converted)
    assert not OnlineLinear.fitted(model)
    fit_linear(model, ex, val_frac=0.2, scales=(1.0,))
    assert OnlineLinear.fitted(model)
    return model, ex


def test_online_learning_keeps_the_zeroed_deep_part_of_a_linear_head_at_zero(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _crossed_rate_log(small_tokenizer, synth_log.ads, n_requests=600)
    model, _ = _linear_fitted_model(fb, small_tokenizer)
    deep = {id(p) for p in model.value.deep_output_parameters()}
    learner = OnlineLearner(model)
    trained = {id(p) for g in learner.opt.param_groups for p in g["params"]}
    assert not deep & trained
    assert not any(p.requires_grad for p in model.value.deep_output_parameters())
    # the variant trains them
    model, _ = _linear_fitted_model(fb, small_tokenizer)
    learner = OnlineLearner(model, RSPOConfig(value_deep_online=True))
    trained = {id(p) for g in learner.opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.value.deep_output_parameters()} <= trained


def test_online_refits_start_from_the_logs_fit_and_follow_new_evidence(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _crossed_rate_log(small_tokenizer, synth_log.ads, n_requests=1200)
    model, ex = _linear_fitted_model(fb, small_tokenizer)
    shown = shown_slates(ex).batch()
    fitted = {k: v.detach().clone() for k, v in model.value.linear_tables().items()}
    online = OnlineLinear(model)
    ad = sorted(synth_log.ads, key=lambda a: a.industry)[0]
    ids = torch.tensor([small_tokenizer.ids_of(ad.ad_id)] * 5)
    ios = next(b for b, f in zip(shown.context, fb, strict=False)
               if f.context["device"] == "ios")[None].expand(5, -1)
    t_logs = float(model.value.linear_fit[2])

    def rows(clicked: float, n: int) -> Impressions:
        z = torch.zeros(n, 2, dtype=torch.float64)
        return Impressions(deep=z, prior=z.clone(), ids=ids[:1].expand(n, -1),
                           context=ios[:1].expand(n, -1),
                           position=torch.zeros(n, dtype=torch.long),
                           clicked=torch.full((n,), clicked, dtype=torch.float64),
                           converted=torch.zeros(n, dtype=torch.float64),
                           time=torch.full((n,), t_logs + 60.0, dtype=torch.float64),
                           exposure=torch.zeros(n, dtype=torch.float64))

    def p_ios() -> float:
        z = model.value.linear_logits(ids[None, :1], ios[:1])[0, 0, 0]
        p = torch.sigmoid(z + model.value.prior_logits(ids[None, :1])[0, 0, 0])
        return float(p.detach())

    before = p_ios()
    online.add(rows(0.0, 1))         # one impression: the logs' fit barely moves
    online.refit()
    one = p_ios()
    assert abs(one - before) < 0.05
    assert all(torch.allclose(v, fitted[k], atol=0.2)
               for k, v in model.value.linear_tables().items())
    online.add(rows(0.0, 3000))      # the cross has gone: never clicked on ios any more
    out = online.refit()
    assert out["linear_rows"] == 3001 and out["linear_refits"] == 2
    assert p_ios() < 0.5 * before


def test_the_online_refit_learns_fatigue_from_the_users_earlier_impressions(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _crossed_rate_log(small_tokenizer, synth_log.ads, n_requests=1200)
    model, ex = _linear_fitted_model(fb, small_tokenizer, value_exposure=True)
    head = model.value
    assert head.exposure and float(head.wide_exposure[0, 0]) == 0.0   # the logs: all 0
    shown = shown_slates(ex).batch()
    ad = synth_log.ads[0]
    ids = torch.tensor([small_tokenizer.ids_of(ad.ad_id)] * 4)
    ctx = shown.context[:1].expand(4, -1)
    t_logs = float(head.linear_fit[2])
    # 2000 fresh impressions of one ad: clicked at 10 % when new to the user, never at
    # its 8th impression (n = 7)
    n = 2000
    seen = torch.tensor([0.0, 7.0]).repeat(n // 2).double()
    clicked = ((seen == 0) & (torch.arange(n) % 20 < 4)).double()
    z = torch.zeros(n, 2, dtype=torch.float64)
    rows = Impressions(deep=z, prior=z.clone(), ids=ids[:1].expand(n, -1),
                       context=ctx[:1].expand(n, -1), position=torch.zeros(n, dtype=torch.long),
                       clicked=clicked, converted=torch.zeros(n, dtype=torch.float64),
                       time=torch.full((n,), t_logs + 60.0, dtype=torch.float64),
                       exposure=seen)
    OnlineLinear(model).refit_with(rows)
    w = float(head.wide_exposure[0, 0])
    assert w < -0.5
    assert float(head.wide_exposure[0, 1]) == 0.0     # pCTR only
    # the served logits: the same ad, fresh vs seen 7 times, apart by w·log(8)
    memory, mask = model.encoder(shown.history[:1], shown.history_mask[:1], shown.context[:1])
    pctr, _ = head(memory, mask, ids[None, :2], context=shown.context[:1],
                   exposure=torch.tensor([[0.0, 7.0]]))
    assert float(pctr[0, 1] - pctr[0, 0]) == pytest.approx(w * math.log(8.0), rel=1e-4)


@torch.no_grad()
def _random_match_tables(model: GenerativeRecommender, seed: int = 0) -> None:
    """Random unit topic, item and code vectors in the topic match's tables (every
    other item row left empty, so those items fall back to their codes) and a weight."""
    head, g = model.value, torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    head.topic_vec.copy_(unit(*head.topic_vec.shape))
    head.code_vec.copy_(unit(*head.code_vec.shape))
    head.item_vec.copy_(unit(*head.item_vec.shape))
    head.item_vec[::2] = 0.0
    head.known_topics[:10] = head.topic_vec[1:11]
    head.known_mask[:10] = 1.0
    head.wide_match.copy_(torch.tensor([[0.8, -0.5]]))


def _exact_match_tables(model: GenerativeRecommender, ctx: torch.Tensor,
                        cands: torch.Tensor) -> None:
    """The first candidate of each request on the request's first organic topic, and
    that topic in the industry of the request's second candidate."""
    head, C = model.value, len(model.cfg.context_features)
    assert head.biz is not None
    with torch.no_grad():
        for b in range(ctx.shape[0]):
            head.item_topic[head.bucket(cands[b, 0])] = ctx[b, C]
            head.topic_industry[ctx[b, C]] = cands[b, 1, head.biz[0]]


def test_the_exact_match_is_the_share_of_the_users_topics_on_the_ads_topic_and_industry(
        ) -> None:
    model = tiny_model(seed=5, value_wide=True, value_topic_match=True, value_match_dim=8,
                       value_exact_match=True)
    _, _, ctx, _, cands = tiny_inputs(model, B=3)
    C, head = len(model.cfg.context_features), model.value
    assert head.biz is not None
    ctx[:, C + 3:] = 0                                  # three organic topics each
    ctx[0, C + 1] = ctx[0, C]                           # the first one twice
    cands[..., head.biz[0]] = torch.arange(4) + 1       # four industries
    _exact_match_tables(model, ctx, cands)
    feats = head.match_features(ctx, cands)
    own, industry = feats[..., 1], feats[..., 2]
    first = (ctx[:, C:C + 3] == ctx[:, C:C + 1]).sum(1).float() / 5.0   # shares over n + 2
    torch.testing.assert_close(own[:, 0], first)
    assert not own[:, 1:].any()
    torch.testing.assert_close(industry[:, 1], first)
    assert not industry[:, 2:].any()


def test_an_ads_topic_is_its_industry_and_the_category_of_its_description() -> None:
    assert ad_topic({"industry": "retail",
                     "description": "Retail · running shoes: trail shoes by Acme."}
                    ) == "retail/running-shoes"
    assert ad_topic({"industry": "retail", "description": "Trail shoes by Acme."}) == ""


@pytest.mark.parametrize(("goal", "topic", "share", "exact"), [
    (False, False, False, False), (True, False, False, False), (False, True, False, False),
    (False, True, True, False), (False, True, False, True)])
def test_the_linear_fits_design_matrix_computes_the_served_linear_terms(
        goal: bool, topic: bool, share: bool, exact: bool) -> None:
    model = tiny_model(seed=5, value_wide=True, value_wide_goal=goal,
                       value_topic_match=topic, value_match_dim=8 if topic else 0,
                       value_share_interest=share, value_exact_match=exact)
    head = model.value
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in head.linear_tables().values():
            t.normal_(0.0, 1.0, generator=g)
        if share:
            head.interest_share.fill_(0.7)
    if topic:
        _random_match_tables(model)
    hist, mask, ctx, _, cands = tiny_inputs(model, B=3)
    ctx[:, -5:] = 0                                     # short organic histories
    ctx[0, len(model.cfg.context_features) + 1] = ctx[0, len(model.cfg.context_features)]
    if exact:
        _exact_match_tables(model, ctx, cands)
    memory, mmask = model.encoder(hist, mask, ctx)
    rows = Impressions.of_slates(head, memory, mmask, cands, torch.ones(3, 4), ctx,
                                 torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3))
    tables = {**head.linear_tables(), "position": torch.zeros(POSITIONS - 1, 2)}
    design = Design(head, rows, {k: v.shape for k, v in tables.items()})
    served = head.linear_logits(cands, ctx).reshape(-1, 2)
    torch.testing.assert_close(design.logits({k: v.double() for k, v in tables.items()},
                                             0.7 if share else 0.0),
                               served.double(), rtol=1e-5, atol=1e-5)


def _topic_of(synth: synthetic.SyntheticLog, ad_id: str) -> str:
    """The organic topic path of an ad's category (``"food/coffee"``)."""
    name = list(synthetic.CATEGORIES)[synth.ad_category[ad_id]]
    return f"{synthetic.CATEGORIES[name][0]}/{name.replace(' ', '-')}"


def _topic_rate_log(tok: UASIDTokenizer, synth: synthetic.SyntheticLog, n_requests: int = 1500,
                    seed: int = 0, cvr: tuple[float, float] = (0.0, 0.0)) -> list[Feedback]:
    """Random slates of 5 for users who each read organic items of one topic; an ad of
    that topic's category is clicked at 0.3, any other at 0.03 (the context is the same
    for everyone, and every ad's mean rate is the same); a click converts at ``cvr[0]``
    on the user's topic, at ``cvr[1]`` elsewhere."""
    rng = np.random.default_rng(seed)
    ads = synth.ads
    topics = sorted({_topic_of(synth, a.ad_id) for a in ads})
    out = []
    for r in range(n_requests):
        topic = topics[r % len(topics)]
        items = []
        for pos, i in enumerate(rng.choice(len(ads), 5, replace=False).tolist()):
            a = ads[i]
            on_topic = _topic_of(synth, a.ad_id) == topic
            clicked = bool(rng.random() < (0.3 if on_topic else 0.03))
            converted = clicked and bool(rng.random() < cvr[0 if on_topic else 1])
            items.append(FeedbackItem(
                ad_id=a.ad_id, semantic_id=list(tok.ids_of(a.ad_id)), position=pos,
                score=0.0, bid=a.bid, bid_type=a.bid_type, clicked=clicked,
                converted=converted, reward=float(clicked)))
        t = 1000.0 + 30.0 * r
        out.append(Feedback(request_id=f"r{r}", user_id=f"u{r}", kind="final", revision=0,
                            impression_time=t, event_time=t + 60, elapsed_s=60,
                            window_closed=True, context={"device": "ios"}, items=items,
                            recent_organic=[f"{topic}#{k}" for k in range(4)]))
    return out


def _match_cfg(tok: UASIDTokenizer) -> dict[str, Any]:
    return {"value_wide": True, "value_topic_match": True,
            "value_match_dim": int(tok.codebooks[0].shape[1])}


def test_the_topic_match_ranks_the_ad_of_the_users_topic_first_before_any_fit(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _topic_rate_log(small_tokenizer, synth_log, n_requests=40)
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer, **_match_cfg(small_tokenizer)))
    ads = synth_log.ads
    fill_topic_match(model, small_tokenizer, fb, ads)
    head = model.value
    ex = build_examples(fb, small_tokenizer, model.cfg.history_len, model.cfg.context_features,
                        model.cfg.context_buckets, 0, organic_len=model.cfg.organic_len)
    cands = torch.tensor([[small_tokenizer.ids_of(a.ad_id) for a in ads]])
    hits = 0
    context = torch.as_tensor(ex.context)
    for i, r in enumerate(ex.request.tolist()):
        topic = fb[r].recent_organic[0].split("#")[0]
        match = head.topic_match(context[i:i + 1], cands)[0]
        best = ads[int(match.argmax())]
        hits += _topic_of(synth_log, best.ad_id) == topic
        assert float(match.min()) >= 0.0 and float(match.max()) <= 1.0
    assert hits >= 0.75 * len(ex.request)


def test_filling_the_topic_match_adds_only_the_ads_and_topics_that_arrived_since(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _topic_rate_log(small_tokenizer, synth_log, n_requests=40)
    model = GenerativeRecommender(small_cfg(small_tokenizer, **_match_cfg(small_tokenizer)))
    head, ads = model.value, synth_log.ads
    # before any topic is known the match is zero, never NaN (a log without organic items)
    ctx = torch.randint(1, 50, (2, len(model.cfg.context_features) + model.cfg.organic_len))
    cands = torch.tensor([[small_tokenizer.ids_of(a.ad_id) for a in ads[:5]]] * 2)
    assert torch.equal(head.topic_match(ctx, cands), torch.zeros(2, 5))
    first = fill_topic_match(model, small_tokenizer, fb[:3], ads[:30])
    assert first["topics"] == 3 and 0 < first["ads"] <= 30
    assert int(head.known_mask.sum()) == 3
    assert fill_topic_match(model, small_tokenizer, fb[:3], ads[:30]) == {"ads": 0, "topics": 0}
    # a record the tokenizer refused (no advertiser: no id) is skipped, not an error
    refused = msgspec.structs.replace(ads[0], ad_id="ad-without-advertiser", advertiser_id="")
    later = fill_topic_match(model, small_tokenizer, fb, [refused, *ads])
    assert later["ads"] > 0 and later["topics"] == len({f.recent_organic[0] for f in fb}) - 3
    rows = head.bucket(torch.tensor([small_tokenizer.ids_of(a.ad_id) for a in ads]))
    assert bool(head.item_vec[rows].abs().sum(-1).gt(0).all())
    # a model without the match is left alone
    plain = GenerativeRecommender(small_cfg(small_tokenizer, value_wide=True))
    assert fill_topic_match(plain, small_tokenizer, fb, ads) == {"ads": 0, "topics": 0}
    assert not hasattr(plain.value, "wide_match")


def test_filling_the_exact_match_puts_each_ad_on_its_topic_and_each_topic_in_its_industry(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    # descriptions in the "<Industry> · <category>: ..." form ad_topic reads
    ads = [msgspec.structs.replace(
        a, description=f"{a.industry.title()} · {_topic_of(synth_log, a.ad_id).split('/')[1]}"
                       f": {a.description}") for a in synth_log.ads]
    fb = _topic_rate_log(small_tokenizer, synth_log, n_requests=12)
    model = GenerativeRecommender(small_cfg(small_tokenizer, **_match_cfg(small_tokenizer),
                                            value_exact_match=True))
    fill_topic_match(model, small_tokenizer, fb, ads)
    ex = build_examples(fb, small_tokenizer, model.cfg.history_len, model.cfg.context_features,
                        model.cfg.context_buckets, 0, organic_len=model.cfg.organic_len)
    cands = torch.tensor([[small_tokenizer.ids_of(a.ad_id) for a in ads]])
    context = torch.as_tensor(ex.context)
    # an ad whose hashed value bucket another ad shares holds the last one's topic
    buckets = model.value.bucket(cands)[0]
    alone = (buckets[:, None] == buckets[None, :]).sum(1) == 1
    assert int(alone.sum()) >= 0.8 * len(ads)
    for i, r in enumerate(ex.request.tolist()):
        topic = fb[r].recent_organic[0].split("#")[0]
        feats = model.value.match_features(context[i:i + 1], cands)[0]       # [K, 3]
        on_topic = torch.tensor([_topic_of(synth_log, a.ad_id) == topic for a in ads])
        in_industry = torch.tensor([a.industry == topic.split("/")[0] for a in ads])
        # four organic items, all on the topic: a share of 4 / (4 + 2)
        torch.testing.assert_close(feats[alone, 1], on_topic[alone].float() * 4 / 6)
        torch.testing.assert_close(feats[:, 2], in_industry.float() * 4 / 6)


def test_the_linear_fit_weighs_the_topic_match_where_clicks_follow_the_users_topics(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    fb = _topic_rate_log(small_tokenizer, synth_log)
    model, train, held = _model_on(fb, small_tokenizer, 0.2, **_match_cfg(small_tokenizer))
    fill_topic_match(model, small_tokenizer, fb, synth_log.ads)
    before = value_metrics(model, held)
    fit_linear(model, train, val_frac=0.2, scales=(1.0,))
    after = value_metrics(model, held)
    assert float(model.value.wide_match[0, 0]) > 1.0
    assert after["value_logloss_ctr"] < before["value_logloss_ctr"] - 0.02


def test_pcvr_shares_the_interest_pctr_learns_where_conversions_follow_the_users_topics(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    # conversions are few (clicks on the user's topic convert at 0.4, others at 0.04):
    # pCVR borrows the interest the many clicks teach pCTR, scaled by a fitted γ
    fb = _topic_rate_log(small_tokenizer, synth_log, cvr=(0.4, 0.04))
    losses = {}
    for share in (False, True):
        model, train, held = _model_on(fb, small_tokenizer, 0.2, **_match_cfg(small_tokenizer),
                                       value_share_interest=share)
        fill_topic_match(model, small_tokenizer, fb, synth_log.ads)
        out = fit_linear(model, train, val_frac=0.2, scales=(1.0,))
        losses[share] = value_metrics(model, held)["value_logloss_cvr"]
    assert not hasattr(GenerativeRecommender(small_cfg(small_tokenizer, value_wide=True)).value,
                       "interest_share")
    gamma = float(model.value.interest_share)
    assert out["value_interest_share"] == pytest.approx(gamma) and gamma > 0.3
    # the match's own pCVR weight can carry much of it here (conversions are not rare
    # enough for the share to be needed): sharing must not cost held-out log-loss
    assert losses[True] < losses[False] + 0.005


def test_the_linear_fit_learns_the_base_rates_in_an_unpenalised_intercept(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer) -> None:
    """Without cell priors (pretraining's default) and under a heavy L2 scale, the base
    click and conversion rates go to the fit's own intercept, not to the penalised
    tables: the head's level matches the log's."""
    fb = _random_slates_log(small_tokenizer, synth_log.ads, 1500, 3, lambda r: "ios",
                            lambda a, device: 0.03)
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer, value_wide=True)).eval()
    ex = build_examples(fb, small_tokenizer, model.cfg.history_len,
                        model.cfg.context_features, model.cfg.context_buckets, 0,
                        organic_len=model.cfg.organic_len)
    assert not model.value.prior_logit.any()
    out = fit_linear(model, ex, val_frac=0.2, scales=(30.0,))
    shown = shown_slates(ex).batch()
    clicked = float((shown.clicked * shown.slate_mask).sum() / shown.slate_mask.sum())
    converted = float((shown.converted * shown.clicked * shown.slate_mask).sum()
                      / (shown.clicked * shown.slate_mask).sum())
    assert out["value_intercept_ctr"] == pytest.approx(math.log(clicked / (1 - clicked)),
                                                       abs=0.4)
    assert out["value_intercept_cvr"] == pytest.approx(
        math.log(converted / (1 - converted)), abs=0.6)
    # served: the intercept sits in the prior logits, every cell alike
    assert torch.allclose(model.value.prior_logit[0],
                          torch.full_like(model.value.prior_logit[0],
                                      out["value_intercept_ctr"]), atol=1e-5)
