"""Small shared fixtures for the learner tests (no services: everything in-process)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from learner import synthetic
from learner.model import GenerativeRecommender, ModelConfig
from learner.pretrain import PretrainResult, PretrainSettings, pretrain
from learner.tokenizer import TokenizerConfig, UASIDTokenizer

SMALL_TOKENIZER = TokenizerConfig(level_sizes=(16, 8), industry_size=16, goal_size=8,
                                  advertiser_size=8, suffix_size=8, encoder="hashing")


def small_settings(run_dir: Path, **kw: object) -> PretrainSettings:
    base: dict[str, object] = dict(
        run_dir=run_dir, encoder="hashing", level_sizes="16,8", industry_size=16, goal_size=8,
        advertiser_size=8, suffix_size=8, d_model=32, n_head=4, n_enc_layer=1, n_layer=4,
        n_top=1, history_len=10, steps=200, batch_size=64, lr=5e-3, progress=False,
        checkpoint_every=0, eval_beam_width=16, eval_k=10, held_out_frac=0.15, threads=1)
    base.update(kw)
    return PretrainSettings(**base)  # type: ignore[arg-type]


def small_cfg(tok: UASIDTokenizer, **kw: object) -> ModelConfig:
    """A small model for ``tok``'s id space (``kw`` overrides any field)."""
    base: dict[str, object] = dict(level_sizes=tok.config.token_sizes,
                                   semantic_levels=tok.config.semantic_levels, history_len=10,
                                   d_model=32, n_head=4, n_enc_layer=1, n_layer=4, n_top=1)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **flags: Any) -> GenerativeRecommender:
    """A tiny model with business-token levels (no tokenizer needed), in eval mode."""
    cfg = ModelConfig(level_sizes=(8, 8, 4, 5, 3, 6), semantic_levels=3, history_len=6,
                      d_model=32, n_head=4, n_enc_layer=2, n_layer=3, n_top=1, **flags)
    torch.manual_seed(seed)
    return GenerativeRecommender(cfg).eval()


def tiny_inputs(model: GenerativeRecommender, B: int = 3, seed: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (history, history_mask, context, target, candidates [B, 4, T]) for
    ``model``; the last request has a shorter history."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    hist = torch.randint(0, 3, (B, cfg.history_len, cfg.id_len), generator=g)
    mask = torch.ones(B, cfg.history_len)
    mask[-1, 3:] = 0
    ctx = torch.randint(1, 50, (B, len(cfg.context_features) + cfg.organic_len), generator=g)
    target = torch.randint(0, 3, (B, cfg.id_len), generator=g)
    cands = torch.randint(0, 3, (B, 4, cfg.id_len), generator=g)
    return hist, mask, ctx, target, cands


@pytest.fixture(scope="session")
def make_settings() -> Callable[..., PretrainSettings]:
    """Factory of small, fast pretraining settings: ``make_settings(run_dir, **overrides)``."""
    return small_settings


@pytest.fixture(scope="session")
def synth_log() -> synthetic.SyntheticLog:
    return synthetic.generate(n_ads=120, n_users=60, n_requests=1500, n_categories=6, seed=1)


@pytest.fixture(scope="session")
def small_tokenizer(synth_log: synthetic.SyntheticLog) -> UASIDTokenizer:
    return UASIDTokenizer.fit(synth_log.ads, SMALL_TOKENIZER)


@pytest.fixture(scope="session")
def trained_lazy(synth_log: synthetic.SyntheticLog,
                 tmp_path_factory: pytest.TempPathFactory) -> PretrainResult:
    run_dir = tmp_path_factory.mktemp("lazy") / "run"
    return pretrain(small_settings(run_dir, mode="lazy_ar"), synth_log.ads, synth_log.feedback)
