"""Learner checkpoints: model + optimizer state + progress, written atomically.

A run directory holds ``checkpoint.pt`` and the tokenizer it was trained with
(``tokenizer/``). Checkpoints never leave the learner (snapshots for serving are
ONNX + JSON, see :mod:`learner.export`); they are read with
``torch.load(weights_only=True)``, so they hold only tensors and plain data.

``save_checkpoint`` steps:
1. serialise to ``checkpoint.pt.tmp`` in the same directory;
2. flush and fsync the file;
3. ``os.replace`` it over ``checkpoint.pt`` (atomic on POSIX): a crash leaves either
   the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from learner.model import GenerativeRecommender, ModelConfig
from learner.tokenizer import IdSpaceMismatchError, UASIDTokenizer

FORMAT = 1
CHECKPOINT = "checkpoint.pt"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or from another format."""


def save_checkpoint(run_dir: str | Path, model: GenerativeRecommender, id_space_version: str,
                    step: int, optimizer: torch.optim.Optimizer | None = None,
                    metrics: dict[str, float] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": FORMAT,
        "config": model.cfg.to_json(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "step": int(step),
        "id_space_version": id_space_version,
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    tmp = d / (CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / CHECKPOINT)
    return d / CHECKPOINT


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        obj: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {obj.get('format')}, "
                              f"this build reads {FORMAT}")
    return obj


def load_model(run_dir: str | Path, tokenizer: UASIDTokenizer | None = None
               ) -> tuple[GenerativeRecommender, UASIDTokenizer, dict[str, Any]]:
    """Model, tokenizer and the raw checkpoint of a run directory.

    Raises :class:`IdSpaceMismatchError` when the model was trained in another id space
    than the tokenizer (the run's own, or the one given)."""
    ckpt = load_checkpoint(run_dir)
    tok = tokenizer or UASIDTokenizer.load(Path(run_dir) / TOKENIZER_DIR)
    tok.check_version(ckpt["id_space_version"], what=f"model in {Path(run_dir).name}")
    cfg = ModelConfig.from_json(ckpt["config"])
    if tuple(cfg.level_sizes) != tok.config.token_sizes:
        raise IdSpaceMismatchError(f"model level sizes {list(cfg.level_sizes)} differ from "
                                   f"the tokenizer's {list(tok.config.token_sizes)}")
    model = GenerativeRecommender(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), tok, ckpt
