"""The value model's factorised terms, its value-only fitting stage and its calibration:
a per-item bias shrunk to the (industry, goal) cell prior, held-out early stopping,
a Platt map fitted on held-out logs and carried by value.onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from learner import synthetic
from learner.data import build_examples, split_by_time
from learner.export import export_snapshot, ort_outputs, reference_inputs, torch_outputs
from learner.losses import value_loss
from learner.model import GenerativeRecommender
from learner.tokenizer import UASIDTokenizer
from learner.value_fit import calibrate, ece, finetune_value, shown_slates, value_metrics
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


def _known_rate_log(tok: UASIDTokenizer, ads: list, n_requests: int = 3000,
                    seed: int = 0) -> tuple[list[Feedback], dict[str, float]]:
    """Random slates of 5 with a known click rate per industry (no user effect)."""
    rng = np.random.default_rng(seed)
    industries = sorted({a.industry for a in ads})
    rate_of = {ind: 0.02 + 0.25 * i / max(1, len(industries) - 1)
               for i, ind in enumerate(industries)}
    ctr = {a.ad_id: rate_of[a.industry] for a in ads}
    out = []
    for r in range(n_requests):
        shown = rng.choice(len(ads), 5, replace=False)
        items = []
        for pos, i in enumerate(shown.tolist()):
            a = ads[i]
            clicked = bool(rng.random() < ctr[a.ad_id])
            items.append(FeedbackItem(
                ad_id=a.ad_id, semantic_id=list(tok.ids_of(a.ad_id)), position=pos,
                score=0.0, bid=a.bid, bid_type=a.bid_type, clicked=clicked,
                converted=clicked and bool(rng.random() < 0.3), reward=float(clicked)))
        t = 1000.0 + 30.0 * r
        out.append(Feedback(request_id=f"r{r}", user_id=f"u{r % 50}", kind="final",
                            revision=0, impression_time=t, event_time=t + 60, elapsed_s=60,
                            window_closed=True, context={"device": "ios"}, items=items))
    return out, ctr


def test_platt_calibration_fitted_on_held_out_logs_removes_a_shift_and_travels_in_the_graph(
        synth_log: synthetic.SyntheticLog, small_tokenizer: UASIDTokenizer,
        tmp_path: Path) -> None:
    fb, ctr = _known_rate_log(small_tokenizer, synth_log.ads)
    torch.manual_seed(0)
    model = GenerativeRecommender(small_cfg(small_tokenizer)).eval()
    ex = build_examples(fb, small_tokenizer, model.cfg.history_len,
                        model.cfg.context_features, model.cfg.context_buckets, 0,
                        organic_len=model.cfg.organic_len)
    train, held = split_by_time(ex, 0.3)
    shown = shown_slates(train).batch()
    model.value.set_priors(shown.slate, shown.slate_mask, shown.clicked, shown.converted)
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
