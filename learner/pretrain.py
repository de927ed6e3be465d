"""``adloop pretrain``: offline VSL + MTP pretraining from logged events.

Steps:
1. read the ad catalog and feedback records (JSONL files, or the ``ads`` and
   ``feedback`` Kafka topics from the beginning to their current end offsets);
2. fit the UA-SID tokenizer (or reuse the run's, giving ids to new ads online);
3. build examples (:mod:`learner.data`) and hold out the latest requests;
4. train VSL + MTP + value-head BCE (:func:`learner.losses.pretrain_loss`) with AdamW,
   checkpointing every ``checkpoint_every`` steps (atomic, :mod:`learner.checkpoint`);
   then value-only epochs with early stopping and a Platt calibration of the value
   heads on the latest training requests, whose slates the main stage's value loss
   left out, and a refit on all of them (:mod:`learner.value_fit`);
5. evaluate recall@K / vNDCG@K and the value model's log-loss and ECE on the
   held-out requests and store them in the checkpoint (they travel into the snapshot
   manifest's ``metrics``).

Deterministic for a seed: model init uses ``torch.manual_seed(seed)`` and the batch of
step s is a pure function of (seed, s), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic_settings import BaseSettings, SettingsConfigDict
from tqdm import tqdm

from learner.beam import TorchBackend
from learner.checkpoint import TOKENIZER_DIR, load_checkpoint, save_checkpoint
from learner.data import (
    ExampleSet,
    build_examples,
    latest_ads,
    latest_organic,
    read_jsonl,
    read_kafka,
    split_by_time,
)
from learner.evaluate import evaluate, trie_of
from learner.losses import pretrain_loss
from learner.model import GenerativeRecommender, ModelConfig
from learner.tokenizer import TokenizerConfig, UASIDTokenizer
from learner.topic_match import fill_topic_match
from learner.value_fit import (
    finetune_value,
    fit_linear,
    value_metrics,
    without_value_split,
)
from streams.features import (
    DEFAULT_CONTEXT_BUCKETS,
    DEFAULT_CONTEXT_FEATURES,
    DEFAULT_ORGANIC_LEN,
)
from streams.logs import get_logger
from streams.metrics import counter, gauge, histogram, start_metrics_server
from streams.schemas import Ad, Feedback, OrganicItem
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)

STEPS = counter("adloop_pretrain_steps_total", "Optimizer steps taken by pretraining.")
LOSS = gauge("adloop_pretrain_loss", "Latest pretraining loss by part.", ("part",))
STEP_SECONDS = histogram("adloop_pretrain_step_seconds", "Wall time of one training step.")
EVAL = gauge("adloop_pretrain_eval", "Held-out evaluation metrics of pretraining.", ("metric",))


class PretrainSettings(BaseSettings):
    """``adloop pretrain`` settings (env ADLOOP_PRETRAIN_<NAME>, flags --name)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_PRETRAIN_", extra="ignore")

    source: str = "file"
    """file (--ads/--feedback JSONL) or kafka (the ads and feedback topics)."""
    ads: Path | None = None
    feedback: Path | None = None
    organic: Path | None = None
    """``organic-items`` records (JSONL) to place in the same id space as the ads, with
    --source file (optional; with --source kafka the topic is read)."""
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = ""
    run_dir: Path = Path("runs/pretrain")
    """Where checkpoint.pt and tokenizer/ are written."""
    resume: bool = True
    """Continue from run_dir's checkpoint (and reuse its tokenizer) when present."""
    refit_tokenizer: bool = False
    """Fit a new id space even if run_dir has a tokenizer (needs resume off)."""
    encoder: str = "minilm"
    level_sizes: str = "256,256,256"
    industry_size: int = 32
    goal_size: int = 16
    advertiser_size: int = 32
    suffix_size: int = 32
    history_len: int = 20
    organic_len: int = DEFAULT_ORGANIC_LEN
    """Organic-history slots of the model's input (0 = ads-only history)."""
    organic_targets: bool = True
    """Organic items of mixed feeds the user engaged with (``Feedback.organic``) are
    generation targets too, weighted by their engagement (a like 1, dwell up to 1 at
    organic_dwell_s): the one model learns what to place in a feed's organic slots. No
    effect on logs without organic items."""
    organic_dwell_s: float = 30.0
    """Dwell seconds worth one like in the organic engagement reward."""
    refine_steps: int = 0
    """RQ-VAE-style refinement steps of a newly fitted tokenizer (0 = RQ-Kmeans only;
    TokenizerConfig.refine_steps)."""
    context_features: str = ""
    """Comma-separated context keys the model reads (empty = the simulated world's
    device, placement, hour, region, age, interest); they go into the snapshot manifest."""
    d_model: int = 64
    n_head: int = 4
    n_enc_layer: int = 2
    n_layer: int = 4
    n_top: int = 1
    mode: str = "lazy_ar"
    inject_mlp: bool = True
    """Residual MLP over the injected prefix vector (ModelConfig.inject_mlp)."""
    mtp_heads: int = 2
    """MTP horizons: the user's next n positives after the target (0 = no MTP)."""
    mtp_mode: str = "pooled"
    """pooled (MLP heads on the pooled memory, the default) or decoder (future ids
    decoded through the decoder with a horizon embedding); ModelConfig.mtp_mode.
    A resumed run keeps its checkpoint's form."""
    prior_heads: int = 0
    """Interaction-type prior heads (0 = off, 2 = click/conversion; ModelConfig). Off by
    default: not better offline on the small synthetic pretraining (learner/README.md)."""
    prior_horizons: int = 2
    """Horizon heads (short/long-term) under each type head (ModelConfig.prior_horizons)."""
    short_horizon: int = 3
    """Recent history ads that make a target short-term (ModelConfig.short_horizon)."""
    prior_mix_mode: str = "predicted"
    """Inference mixture of the prior heads: predicted or fixed (ModelConfig)."""
    prior_weight: float = 0.5
    """Weight of the routed prior CE and the prior classifier's CE."""
    value_own_items: bool = True
    """The value head gets its own item table (see ModelConfig.value_own_items)."""
    task_tokens: bool = False
    """OneRanker task tokens [T_interest, T_value] (ModelConfig.task_tokens)."""
    fake_items: bool = False
    """OneRanker Fake Item Tokens, one per level-0 code (ModelConfig.fake_items)."""
    ranker_kv: bool = False
    """The ranking decoder reads the generator's cached keys/values (ModelConfig.ranker_kv)."""
    intent_tokens: int = 0
    """GPR's HHD intent decoder: learned intent queries over the user rows, added to the
    memory (ModelConfig.intent_tokens; 0 = off)."""
    n_intent_layer: int = 1
    """Blocks of the intent decoder (ModelConfig.n_intent_layer)."""
    intent_mode: str = "append"
    """append (intents after the user rows) or replace (intents instead of them);
    ModelConfig.intent_mode."""
    dc_weight: float = 0.0
    """Weight of the Distribution Consistency loss over each shown slate (0 = off)."""
    dc_tau: float = 1.0
    """Temperature of the ranker's side of the DC loss."""
    value_priors: bool = False
    """Set the value head's prior logits per (industry, goal) from the logs
    (``ValueHead.set_priors``). Off by default: with the linear terms fitted to
    convergence (``value_wide``) the fixed offset cost revenue in the closed loop
    (docs/decisions.md); the fit's own industry and code terms learn the base rates."""
    value_factors: bool = True
    """Factorised value terms: a per-item bias under an L2 prior (an ad with little data
    keeps the rest of the head's logit: its cells' base rates) and user × item
    interactions (ModelConfig.value_factors)."""
    value_factors_cvr: bool = False
    """The factorised terms on pCVR too (ModelConfig.value_factors_cvr; off: pCTR only)."""
    value_rank: int = 16
    """Rank of the value head's user × item interaction (ModelConfig.value_rank)."""
    value_bias_prior: float = 2.0
    """Strength λ of the per-item biases' prior, in pseudo-observations (their L2
    weight is λ / impressions for pCTR, λ / clicks for pCVR)."""
    value_wide: bool = True
    """Wide terms in the value head (context values and organic-topic shares × the
    candidate's industry and level-0 code; ModelConfig.value_wide), fitted to
    convergence after pretraining (learner.value_fit.fit_linear) and refitted online
    (learner.value_fit.OnlineLinear). Off: the head of earlier versions."""
    value_wide_goal: bool = False
    """The wide terms key on the candidate's goal (bid type) too
    (ModelConfig.value_wide_goal): a base rate per goal, learned by the fit."""
    value_topic_match: bool = True
    """The value head's wide terms match the candidate's content against the user's
    recent organic topics (ModelConfig.value_topic_match, learner.topic_match)."""
    value_match_sharpness: float = 80.0
    """ModelConfig.value_match_sharpness."""
    value_exact_match: bool = True
    """Two more topic-match features per head: the share of the user's recent organic
    topics that are the candidate's own topic exactly, and that are in its industry
    (ModelConfig.value_exact_match; needs ``value_topic_match``). Off: the soft text
    match alone, the head of earlier versions (docs/decisions.md, "Exact topic match")."""
    value_share_interest: bool = False
    """pCVR shares pCTR's interest terms, scaled by a fitted γ
    (ModelConfig.value_share_interest). Off: it did not pay on the tuning seeds
    (docs/decisions.md, "pCVR shares pCTR's interest")."""
    value_exposure: bool = True
    """A pCTR term w · log(1 + n) for the user's earlier impressions n of the candidate
    (creative fatigue; ModelConfig.value_exposure): the server counts them
    (server/exposure.py), feedback records carry them (FeedbackItem.exposure) and the
    linear fit learns w. Needs ``value_wide``. Off: the head of earlier versions."""
    value_linear_deep: bool = False
    """The value fit may keep the rest of the head (decoder logits, user × item
    interaction) under the linear terms when the value split prefers it
    (learner.value_fit.fit_linear ``try_deep``). Off: the pretrained value model serves
    the linear terms alone; its decoder output and interaction start at zero and grow
    online under RSPO's value loss, from the decoder blocks the value-only epochs trained
    (docs/decisions.md). Needs ``value_epochs`` > 0."""
    value_wide_prior: float = 3.0
    """Strength of the wide terms' L2 prior in pseudo-observations, as for
    ``value_bias_prior``."""
    value_epochs: int = 40
    """Most value-only epochs after pretraining (encoder and generator frozen; their
    count chosen by early stopping on a time split; learner.value_fit.finetune_value).
    0 = no value fit after pretraining: neither these epochs nor the linear fit."""
    value_val_frac: float = 0.15
    """Latest share of the training requests whose slates the value head does not see
    until the end: they choose the value-only epoch count and fit the calibration map,
    then the head is refitted on all training requests (learner.value_fit)."""
    value_patience: int = 4
    """Stop the value-only epochs after this many without a better held-out log-loss."""
    value_lr: float = 3e-3
    value_calibrate: bool = True
    """Fit a Platt map per value head on the value split (in value.onnx; a head with
    fewer than 30 events there keeps the identity)."""
    value_calibrate_scale: bool = False
    """Fit the Platt map's scale too (a variant; docs/decisions.md, "Calibration shift
    only"). Off: the map is a shift of the logit, which corrects the base rate the
    split drifted to without flattening the differences between ads."""
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    mtp_gamma: float = 0.5
    """Weight of MTP horizon h is mtp_gamma^(h-1) (learner.losses.mtp_loss)."""
    value_weight: float = 0.5
    w_min: float = 0.2
    w_max: float = 5.0
    seed: int = 0
    held_out_frac: float = 0.1
    checkpoint_every: int = 200
    eval_beam_width: int = 32
    eval_k: int = 10
    metrics_port: int = -1
    """Serve /metrics on this port (0 picks one, -1 none)."""
    progress: bool = True
    threads: int = 0
    """torch intra-op threads (0 = torch's default)."""


@dataclass
class PretrainResult:
    model: GenerativeRecommender
    tokenizer: UASIDTokenizer
    metrics: dict[str, float]
    step: int
    run_dir: Path


def load_events(s: PretrainSettings) -> tuple[list[Ad], list[Feedback], list[OrganicItem]]:
    """(latest ads, feedback, latest active organic items) per the settings."""
    if s.source == "file":
        if s.ads is None or s.feedback is None:
            raise SystemExit("adloop pretrain: --ads and --feedback JSONL files are required "
                             "with --source file")
        organic = read_jsonl(s.organic, OrganicItem) if s.organic is not None else []
        return (latest_ads(read_jsonl(s.ads, Ad)), read_jsonl(s.feedback, Feedback),
                active_organic(organic))
    if s.source == "kafka":
        from streams.topics import Topics

        topics = Topics(s.topic_prefix)
        ads = read_kafka(s.bootstrap_servers, topics.ads, Ad)
        organic = read_kafka(s.bootstrap_servers, topics.name("organic-items"), OrganicItem)
        return (latest_ads(ads), read_kafka(s.bootstrap_servers, topics.feedback, Feedback),
                active_organic(organic))
    raise SystemExit(f"adloop pretrain: unknown --source {s.source!r} (file or kafka)")


def active_organic(items: list[OrganicItem]) -> list[OrganicItem]:
    """The newest state of each organic item, removed ones left out."""
    return [o for o in latest_organic(items) if o.status == "active"]


def tokenizer_for(s: PretrainSettings, ads: list[Ad],
                  organic: Sequence[OrganicItem] = ()) -> UASIDTokenizer:
    """run_dir's tokenizer with ids for new ads and organic items, or a new id space
    fitted on ``ads`` and ``organic`` together (one set of codebooks)."""
    tok_dir = Path(s.run_dir) / TOKENIZER_DIR
    if (tok_dir / "tokenizer.json").exists() and not s.refit_tokenizer:
        tok = UASIDTokenizer.load(tok_dir)
        new = [a for a in ads if a.ad_id not in tok]
        if new:
            tok.add_ads(new)
            log.info("assigned ids to new ads", count=len(new))
        known = tok.organic_table()
        new_org = [o for o in organic if o.item_id not in known]
        if new_org:
            tok.add_organic(new_org)
            log.info("assigned ids to new organic items", count=len(new_org))
    else:
        cfg = TokenizerConfig(
            level_sizes=tuple(int(x) for x in s.level_sizes.split(",")),
            industry_size=s.industry_size, goal_size=s.goal_size,
            advertiser_size=s.advertiser_size, suffix_size=s.suffix_size, seed=s.seed,
            encoder=s.encoder, refine_steps=s.refine_steps)
        tok = UASIDTokenizer.fit(ads, cfg, organic=list(organic))
        log.info("fitted tokenizer", **{k: v for k, v in tok.report().items()
                                        if not isinstance(v, list)})
    tok.save(tok_dir)
    return tok


def context_features_of(s: PretrainSettings) -> tuple[str, ...]:
    """The model's context keys: ``--context-features`` or the defaults."""
    names = tuple(n.strip() for n in s.context_features.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise SystemExit(f"adloop pretrain: --context-features repeats a key: "
                         f"{s.context_features!r}")
    return names or DEFAULT_CONTEXT_FEATURES


def model_config(s: PretrainSettings, tok: UASIDTokenizer) -> ModelConfig:
    return ModelConfig(
        level_sizes=tok.config.token_sizes, semantic_levels=tok.config.semantic_levels,
        history_len=s.history_len, context_features=context_features_of(s),
        context_buckets=DEFAULT_CONTEXT_BUCKETS, organic_len=s.organic_len,
        d_model=s.d_model, n_head=s.n_head,
        n_enc_layer=s.n_enc_layer, n_layer=s.n_layer, n_top=s.n_top, mode=s.mode,
        inject_mlp=s.inject_mlp, mtp_heads=s.mtp_heads, mtp_mode=s.mtp_mode,
        prior_heads=s.prior_heads, prior_horizons=s.prior_horizons,
        short_horizon=s.short_horizon, prior_mix_mode=s.prior_mix_mode,
        value_own_items=s.value_own_items, task_tokens=s.task_tokens, fake_items=s.fake_items,
        ranker_kv=s.ranker_kv, intent_tokens=s.intent_tokens,
        n_intent_layer=s.n_intent_layer, intent_mode=s.intent_mode,
        value_factors=s.value_factors, value_factors_cvr=s.value_factors_cvr,
        value_rank=s.value_rank,
        # wide terms read the business tokens (industry) and extend the factorised terms
        value_wide=(s.value_wide and s.value_factors
                    and len(tok.config.token_sizes) >= tok.config.semantic_levels + 2),
        value_wide_goal=s.value_wide_goal, value_topic_match=s.value_topic_match,
        value_match_dim=int(tok.codebooks[0].shape[1]),
        value_match_sharpness=s.value_match_sharpness, value_exact_match=s.value_exact_match,
        value_share_interest=s.value_share_interest,
        value_exposure=s.value_exposure and s.value_wide and s.value_factors)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of step ``step``: epoch-wise permutations seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size: (k + 1) * batch_size]


def train_steps(model: GenerativeRecommender, opt: torch.optim.Optimizer, train: ExampleSet,
                start: int, stop: int, s: PretrainSettings,
                on_checkpoint: Callable[[int], None] | None = None) -> dict[str, float]:
    """Run steps ``start..stop-1``; the pure training core (no I/O besides callbacks)."""
    model.train()
    parts: dict[str, float] = {}
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not s.progress,
               desc="pretrain", unit="step")
    for step in bar:
        t0 = time.perf_counter()
        batch = train.batch(batch_indices(len(train), s.batch_size, s.seed, step))
        loss, parts = pretrain_loss(model, batch, s.mtp_weight, s.value_weight,
                                    s.prior_weight, w_min=s.w_min, w_max=s.w_max,
                                    dc_weight=s.dc_weight, dc_tau=s.dc_tau,
                                    mtp_gamma=s.mtp_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        STEPS.inc()
        STEP_SECONDS.observe(time.perf_counter() - t0)
        for k, v in parts.items():
            LOSS.labels(k).set(v)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", vsl=f"{parts['vsl']:.3f}")
        if on_checkpoint is not None and s.checkpoint_every > 0 \
                and (step + 1) % s.checkpoint_every == 0 and step + 1 < stop:
            on_checkpoint(step + 1)
    model.eval()
    return parts


def pretrain(s: PretrainSettings, ads: list[Ad] | None = None,
             feedback: list[Feedback] | None = None,
             organic: Sequence[OrganicItem] | None = None) -> PretrainResult:
    """The whole offline run (events given directly, or read per the settings).
    ``organic``: organic items (videos, articles) placed in the ads' id space, so a
    mixed feed can serve them (none: an ads-only id space)."""
    if s.threads:
        torch.set_num_threads(s.threads)
    if ads is None or feedback is None:
        ads, feedback, organic = load_events(s)
    run_dir = Path(s.run_dir)
    ckpt: dict[str, Any] | None = None
    if s.resume and (run_dir / "checkpoint.pt").exists():
        ckpt = load_checkpoint(run_dir)
        if s.refit_tokenizer:
            raise SystemExit("adloop pretrain: --refit-tokenizer makes a new id space; "
                             "it cannot resume a checkpoint (use --no-resume)")
    tok = tokenizer_for(s, ads, organic or ())
    cfg = model_config(s, tok)
    if ckpt is not None:
        tok.check_version(ckpt["id_space_version"], what=f"checkpoint in {run_dir}")
        cfg = ModelConfig.from_json(ckpt["config"])
    torch.manual_seed(s.seed)
    model = GenerativeRecommender(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    start = 0
    # the model as the training steps left it, before the value-only stage: what a run
    # that continues takes up, so a resumed run equals an uninterrupted one
    train_state: dict[str, Any] | None = None
    if ckpt is not None:
        start = int(ckpt["step"])
        train_state = ckpt.get("extra", {}).get("train_state")
        model.load_state_dict(train_state if train_state is not None and start < s.steps
                              else ckpt["model"])
        if ckpt.get("optimizer") is not None:
            opt.load_state_dict(ckpt["optimizer"])
        log.info("resumed", step=start, run_dir=str(run_dir))

    examples = build_examples(feedback, tok, cfg.history_len, cfg.context_features,
                              cfg.context_buckets, cfg.mtp_heads, organic_len=cfg.organic_len,
                              short_horizon=cfg.short_horizon,
                              organic_dwell_s=s.organic_dwell_s if s.organic_targets else None)
    train, test = split_by_time(examples, s.held_out_frac)
    # the value model's split: its slates stay out of the main stage's value loss
    main = without_value_split(train, s.value_val_frac) if s.value_epochs > 0 else train
    if ckpt is None and len(train) and s.value_priors:
        first = np.unique(main.request, return_index=True)[1]    # each shown slate once
        shown = main.subset(first).batch()
        rates = model.value.set_priors(shown.slate, shown.slate_mask, shown.clicked,
                                       shown.converted)
        log.info("value priors", **rates)
    if ckpt is None:
        fill_topic_match(model, tok, feedback, ads or ())
    if ckpt is None and len(train) and (model.value.factors or model.value.wide):
        mask = main.slate_mask
        per_event = torch.tensor([1.0 / max(float(mask.sum()), 1.0),
                                  1.0 / max(float((main.clicked * mask).sum()), 1.0)])
        if model.value.factors:
            model.value.bias_l2.copy_(s.value_bias_prior * per_event)
        if model.value.wide:
            model.value.wide_l2.copy_(s.value_wide_prior * per_event)
    log.info("examples", train=len(train), held_out=len(test),
             positives=len(train.positives),
             organic_positives=len(train.organic_positives), params=model.num_parameters())

    def checkpoint(step: int, metrics: dict[str, float] | None = None) -> None:
        extra: dict[str, Any] = {"data_watermark": float(examples.time.max(initial=0.0))}
        if train_state is not None:
            extra["train_state"] = train_state
        save_checkpoint(run_dir, model, tok.id_space_version, step, opt, metrics, extra=extra)

    value: dict[str, float] = {}
    if start < s.steps:
        train_state = None      # while it trains, the model is its own training state
        train_steps(model, opt, main, start, s.steps, s, checkpoint)
        if s.value_epochs > 0:
            train_state = {k: v.clone() for k, v in model.state_dict().items()}
            value.update(finetune_value(model, train, s.value_val_frac, s.value_epochs,
                                        s.value_patience, s.value_lr, s.batch_size,
                                        seed=s.seed, calibrate_on_split=s.value_calibrate,
                                        calibrate_scale=s.value_calibrate_scale))
            value.update(fit_linear(model, train, s.value_val_frac,
                                    calibrate_on_split=s.value_calibrate,
                                    calibrate_scale=s.value_calibrate_scale,
                                    try_deep=s.value_linear_deep))
    if len(test):
        value.update(value_metrics(model, test))
        log.info("value model", **value)
    metrics: dict[str, float] = {}
    if len(test.positives):
        trie, _ = trie_of(tok)
        metrics = evaluate(TorchBackend(model), test, trie, s.eval_beam_width, (s.eval_k,))
    metrics.update({k: v for k, v in value.items() if k.startswith("value_")})
    for k, v in metrics.items():
        EVAL.labels(k).set(v)
    checkpoint(max(start, s.steps), metrics)
    log.info("pretrained", step=max(start, s.steps), **metrics)
    return PretrainResult(model, tok, metrics, max(start, s.steps), run_dir)


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, PretrainSettings)


def run(args: argparse.Namespace) -> int:
    s = settings_from_args(PretrainSettings, args)
    server = start_metrics_server(s.metrics_port) if s.metrics_port >= 0 else None
    try:
        pretrain(s)
    finally:
        if server is not None:
            server.stop()
    return 0
