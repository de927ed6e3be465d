"""UA-SID: the ad tokenizer (GR4AD §1.2 of mechanisms.md).

An ad's id is T tokens::

    [ c_0, c_1, ..., c_{L-1} | industry, goal, advertiser | suffix ]
      semantic codes          business tokens              disambiguation

* **Semantic codes** come from residual balanced k-means (RQ-KMeans, OneRec-style
  balanced assignment so every code is used about equally) over the ad's content
  embedding (:func:`learner.embeddings.embed_ads`). Per-level sizes may differ
  ("multi-resolution"), default 3 x 256.
* **Business tokens** [reconstruction, mechanisms.md §1.2 item 3]: industry, the
  (bid type, conversion goal) pair and an advertiser bucket. The same creative under
  a different commercial setup therefore gets a different id even though its
  content embedding is identical.
* **Suffix** (TIGER-style disambiguation token): ads that still share the first T-1
  tokens get 0, 1, 2, ... so no two ads share an id. If a prefix has used every
  suffix, the ad moves to the nearest last-level code with a free suffix
  (FORGE/OnePiece-style reassignment).

New ads get ids online (:meth:`UASIDTokenizer.assign`: nearest codes, next free
suffix) without touching the codebooks; ids of existing ads never change.
Refitting (:meth:`UASIDTokenizer.fit`) is an explicit offline step and produces a
new ``id_space_version``; a model trained in one id space refuses another
(:class:`IdSpaceMismatchError`).

Saved as a directory: ``tokenizer.json`` (config, vocabularies, the id table,
version; ``organic_ids`` when there are organic items) and ``codebooks.npz`` (float32
centroids ``level_<l>``; a refined tokenizer adds ``encoder.*`` and ``decoder.*``),
which round-trips exactly. Config fields added with organic items, auto sizes and
refinement are written only when they differ from their defaults, so a plain
RQ-KMeans tokenizer writes (and hashes into its version) the same file as before,
and files without them load with the old behaviour.

**Organic items in the same id space** (GPR §2.1 of mechanisms.md [paper]: organic
content and ads share one multi-level semantic-ID space). Organic items (videos,
articles: an id, a text and a topic) are embedded by the same encoder, may take part
in the codebook fit (``fit(ads, organic=...)``) and are quantised by the same
codebooks, so an organic item and an ad with the same content get the same semantic
codes. They have no business fields; their business tokens are the reserved
"organic" value ``(industry 0, goal 0, topic bucket)`` [reconstruction]: token 0 of
the industry and goal vocabularies is never given to an ad (known values take
``[1, size)``), so no organic id can equal an ad id, and the advertiser slot carries
a hash bucket of the item's topic. Organic ids live in their own table
(:meth:`UASIDTokenizer.organic_table`); ``table()``, ``id_array()`` and ``len()``
stay ads only, because only ads are servable.

**Coarse-to-fine sizes**: ``TokenizerConfig(level_sizes="auto")`` picks per-level
sizes for the catalogue at fit time with :func:`auto_level_sizes` (level 0
coarsest, each level ``auto_growth`` times the previous one).

**RQ-Kmeans+ refinement** (GPR's "RQ-Kmeans+" [paper]: RQ-KMeans initialisation,
then the RQ-VAE loss, with a residual connection on the encoder side against
codebook collapse; the exact networks and losses are a reconstruction): with
``refine_steps > 0`` a small encoder ``z = x + MLP(x)`` and decoder ``x^ = q + MLP(q)``
(second layers zero-initialised, so step 0 is exactly the RQ-KMeans tokenizer) are
trained together with the codebooks by :func:`refine_rq` (straight-through
estimator, codebook + commitment losses, dead-code reset). An optional
co-occurrence term (GR4AD's "co-occurrence learning" [secondary]; the InfoNCE form
is mechanisms.md §1.2's reconstruction) pulls the latents of co-consumed items
together. New items are placed online through the refined encoder.
``TokenizerConfig.assignment`` chooses how fit-time items take codes, during the
refinement and in their ids: ``"balanced"`` (as RQ-KMeans, the default) or
``"nearest"`` (classic RQ-VAE). On the simulated catalogue (docs/benchmarks.md,
``## tokenizer``) the refinement lowers the reconstruction error with nearest codes
and not with balanced ones, whose greedy assignment is too noisy to train against.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from learner.embeddings import DEFAULT_ENCODER, ad_text, embed_ads
from streams.features import organic_topic
from streams.schemas import OrganicItem as OrganicRecord

FORMAT = 1
BUSINESS_FIELDS = ("industry", "bid_type", "conversion_goal", "advertiser_id")
ORGANIC_INDUSTRY = 0
"""Industry token of every organic item (never given to an ad)."""
ORGANIC_GOAL = 0
"""Goal token of every organic item (never given to an ad)."""


class TokenizerError(ValueError):
    """Base of every tokenizer error; the message names what is wrong."""


class MissingAttributeError(TokenizerError):
    """An ad lacks a business attribute the id needs."""


class UnknownAdError(TokenizerError, LookupError):
    """An ad id that has no id in this id space."""


class UnknownIdError(TokenizerError, LookupError):
    """A token sequence that is not the id of any ad (or is out of range)."""


class IdSpaceMismatchError(TokenizerError):
    """Two artefacts (model, tokenizer, snapshot) were built in different id spaces."""


class IdSpaceFullError(TokenizerError):
    """No free id near an ad's codes: refit with larger codebooks or suffix vocabulary."""


@dataclass(frozen=True)
class TokenizerConfig:
    level_sizes: tuple[int, ...] | str = (256, 256, 256)
    """Codebook size per semantic level, or ``"auto"``: :func:`auto_level_sizes` picks
    them (coarse to fine) for the catalogue at fit time, and the fitted tokenizer's
    config holds the chosen sizes (with ``auto_sizes=True``)."""
    industry_size: int = 32
    goal_size: int = 16
    """Vocabulary of (bid type, conversion goal) pairs."""
    advertiser_size: int = 32
    """Advertiser ids are hashed into this many buckets."""
    suffix_size: int = 32
    kmeans_iters: int = 12
    seed: int = 0
    encoder: str = DEFAULT_ENCODER
    # ---- coarse-to-fine sizes ("auto")
    auto_levels: int = 3
    """Number of semantic levels when ``level_sizes="auto"``."""
    auto_growth: float = 2.0
    """Each level has about this many times the codes of the level before."""
    auto_oversample: float = 4.0
    """The product of the auto sizes is about this many times the catalogue size."""
    auto_sizes: bool = False
    """True when ``level_sizes`` were chosen by the "auto" rule (set by ``fit``)."""
    # ---- RQ-Kmeans+ refinement (0 steps = plain RQ-KMeans)
    refine_steps: int = 0
    refine_lr: float = 1e-3
    refine_hidden: int = 128
    """Hidden width of the residual encoder and decoder MLPs."""
    refine_batch: int = 1024
    """Items per refinement step (the whole catalogue when smaller)."""
    commitment_beta: float = 0.25
    dead_code_reset_every: int = 20
    """Every this many steps, codes no item chose since the last check are moved onto
    random current residuals (0 = never)."""
    cooc_weight: float = 0.0
    """Weight of the co-occurrence InfoNCE term (needs ``cooc`` pairs at fit)."""
    cooc_temperature: float = 0.1
    cooc_batch: int = 256
    assignment: str = "balanced"
    """How fit-time items get their codes, in the refinement and in the final ids:
    ``"balanced"`` (:func:`balanced_assign` per level, every code used about equally)
    or ``"nearest"`` (the classic RQ-VAE nearest code, where dead-code reset matters).
    Items placed online always take the nearest codes."""

    def __post_init__(self) -> None:
        if isinstance(self.level_sizes, str):
            if self.level_sizes != "auto":
                raise TokenizerError(f"level_sizes must be sizes or 'auto', "
                                     f"got {self.level_sizes!r}")
            if self.auto_levels < 1 or self.auto_growth < 1.0 or self.auto_oversample <= 0:
                raise TokenizerError("auto sizes need auto_levels >= 1, auto_growth >= 1 "
                                     "and auto_oversample > 0")
            sem: tuple[int, ...] = ()
        else:
            object.__setattr__(self, "level_sizes", tuple(int(x) for x in self.level_sizes))
            sem = self.sizes
            if not sem:
                raise TokenizerError("level_sizes is empty")
        sizes = (*sem, self.industry_size, self.goal_size,
                 self.advertiser_size, self.suffix_size)
        if any(int(s) < 1 for s in sizes):
            raise TokenizerError(f"every vocabulary size must be >= 1, got {sizes}")
        if self.industry_size < 2 or self.goal_size < 2:
            raise TokenizerError("industry_size and goal_size need >= 2 (0 means 'other')")
        if self.assignment not in ("balanced", "nearest"):
            raise TokenizerError(f"assignment must be 'balanced' or 'nearest', "
                                 f"got {self.assignment!r}")
        if self.refine_steps < 0 or self.cooc_weight < 0 or self.dead_code_reset_every < 0:
            raise TokenizerError("refine_steps, cooc_weight and dead_code_reset_every "
                                 "must be >= 0")

    @property
    def resolved(self) -> bool:
        """False while ``level_sizes`` is still ``"auto"`` (before ``fit``)."""
        return not isinstance(self.level_sizes, str)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The per-level codebook sizes (raises while they are still ``"auto"``)."""
        if isinstance(self.level_sizes, str):
            raise TokenizerError("level_sizes is 'auto': fit the tokenizer to choose them")
        return self.level_sizes

    def resolve(self, n_items: int) -> TokenizerConfig:
        """This config with ``"auto"`` sizes chosen for ``n_items`` (else itself)."""
        if self.resolved:
            return self
        return replace(self, level_sizes=auto_level_sizes(
            n_items, self.auto_levels, self.auto_growth, self.auto_oversample),
            auto_sizes=True)

    @property
    def semantic_levels(self) -> int:
        return self.auto_levels if isinstance(self.level_sizes, str) else len(self.level_sizes)

    @property
    def token_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of every id position, semantic levels first (``level_sizes``
        in the snapshot manifest)."""
        return (*self.sizes, self.industry_size, self.goal_size,
                self.advertiser_size, self.suffix_size)

    @property
    def id_len(self) -> int:
        return len(self.token_sizes)

    def to_json(self) -> dict[str, Any]:
        """Every field; the fields added after format 1's first release are left out
        while they hold their defaults, so a config of the old kind serialises (and
        hashes into its ``id_space_version``) exactly as before."""
        d = asdict(self)
        d["level_sizes"] = (self.level_sizes if isinstance(self.level_sizes, str)
                            else list(self.level_sizes))
        for f in fields(self):
            if f.name in _LATER_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenizerConfig:
        """Inverse of :meth:`to_json`; missing later fields take their defaults (the
        old behaviour: no refinement, no co-occurrence term, explicit sizes)."""
        d = dict(d)
        ls = d["level_sizes"]
        d["level_sizes"] = ls if isinstance(ls, str) else tuple(int(s) for s in ls)
        return cls(**d)


_LATER_FIELDS = frozenset({
    "auto_levels", "auto_growth", "auto_oversample", "auto_sizes", "refine_steps",
    "refine_lr", "refine_hidden", "refine_batch", "commitment_beta",
    "dead_code_reset_every", "cooc_weight", "cooc_temperature", "cooc_batch", "assignment"})


def auto_level_sizes(n_items: int, levels: int = 3, growth: float = 2.0,
                     oversample: float = 4.0) -> tuple[int, ...]:
    """Coarse-to-fine codebook sizes for a catalogue of ``n_items`` [reconstruction].

    Rule: ``size_l = round(s0 * growth**l)`` for ``l = 0..levels-1``, with ``s0`` chosen
    so that the product of the sizes is ``oversample * n_items`` (room for every item to
    have its own semantic prefix), i.e. ``s0 = (oversample * n / growth**(L(L-1)/2))**(1/L)``
    -- about ``n**(1/L)`` per level, smaller at level 0 (the coarsest, "what the item is
    about") and larger at the last. Every size is at least 2, at most ``max(2, n_items)``
    and never smaller than the level before.
    """
    if n_items < 1 or levels < 1:
        raise TokenizerError(f"auto sizes need n_items >= 1 and levels >= 1, "
                             f"got {n_items}, {levels}")
    s0 = (oversample * n_items / growth ** (levels * (levels - 1) / 2)) ** (1.0 / levels)
    cap = max(2, n_items)
    out: list[int] = []
    for lvl in range(levels):
        size = min(cap, max(2, round(s0 * growth ** lvl)))
        out.append(max(size, out[-1]) if out else size)
    return tuple(out)


# --------------------------------------------------------------------------------------
# business attributes


@dataclass(frozen=True)
class AdInfo:
    """What the tokenizer needs of an ad (from a ``streams.schemas.Ad`` or a dict)."""

    ad_id: str
    industry: str
    bid_type: str
    conversion_goal: str
    advertiser_id: str
    text: str


def ad_info(ad: Any) -> AdInfo:
    """Validate and extract; raises :class:`MissingAttributeError` naming the fields."""
    get = (ad.get if isinstance(ad, Mapping) else lambda k, _d=None: getattr(ad, k, None))
    ad_id = get("ad_id")
    if not ad_id:
        raise MissingAttributeError("ad is missing its ad_id")
    missing = [f for f in BUSINESS_FIELDS if not get(f)]
    if missing:
        raise MissingAttributeError(
            f"ad {ad_id!r} is missing business attribute(s) {', '.join(missing)}; "
            "UA-SID needs industry, bid_type, conversion_goal and advertiser_id")
    title, desc = get("title") or "", get("description") or ""
    if not (title or desc):
        raise MissingAttributeError(f"ad {ad_id!r} has neither title nor description to embed")
    return AdInfo(str(ad_id), str(get("industry")), str(get("bid_type")),
                  str(get("conversion_goal")), str(get("advertiser_id")),
                  ad_text({"title": title, "description": desc}))


@dataclass(frozen=True)
class OrganicItem:
    """An organic item (video, article): its id, the text it is embedded from and its
    topic (default: the id's ``<topic>#<n>`` prefix, :func:`streams.features.organic_topic`)."""

    item_id: str
    text: str
    topic: str = ""


def organic_info(item: Any) -> OrganicItem:
    """An :class:`OrganicItem` from one, an ``organic-items`` record
    (:class:`streams.schemas.OrganicItem`: its title and description are the text, as
    an ad's), a mapping (``item_id``, ``text``, optional ``topic``) or a tuple
    ``(item_id, text[, topic])``; the topic defaults to the id's."""
    item_id: Any
    text: Any
    topic: Any
    if isinstance(item, OrganicItem):
        item_id, text, topic = item.item_id, item.text, item.topic
    elif isinstance(item, OrganicRecord):
        item_id, text, topic = item.item_id, ad_text(item), item.topic
    elif isinstance(item, Mapping):
        item_id, text, topic = item.get("item_id"), item.get("text"), item.get("topic")
    elif isinstance(item, tuple | list) and 2 <= len(item) <= 3:
        item_id, text = item[0], item[1]
        topic = item[2] if len(item) == 3 else ""
    else:
        raise TokenizerError(f"not an organic item: {item!r}")
    if not item_id:
        raise MissingAttributeError("organic item is missing its item_id")
    if not text:
        raise MissingAttributeError(f"organic item {item_id!r} has no text to embed")
    return OrganicItem(str(item_id), str(text), str(topic or organic_topic(str(item_id))))


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


@dataclass
class _Vocab:
    """value -> token in [1, size); 0 is never used for a known value ("other" slot).
    New values take the next free slot; once full they hash into [1, size)."""

    size: int
    table: dict[str, int] = field(default_factory=dict)

    def token(self, value: str, grow: bool = True) -> int:
        tok = self.table.get(value)
        if tok is not None:
            return tok
        if grow and len(self.table) < self.size - 1:
            tok = self.table[value] = len(self.table) + 1
            return tok
        return 1 + _stable_hash(value) % (self.size - 1)


# --------------------------------------------------------------------------------------
# residual balanced k-means


def _sqdist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[n, d], [k, d] -> [n, k] squared Euclidean distances."""
    out: np.ndarray = (x * x).sum(1, keepdims=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return out


def balanced_assign(dist: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each cluster (in random order) takes its ceil(n/k) nearest unassigned points."""
    n, k = dist.shape
    cap = math.ceil(n / k)
    assign = np.full(n, -1, dtype=np.int64)
    free = np.ones(n, dtype=bool)
    for j in rng.permutation(k):
        idx = np.flatnonzero(free)
        if idx.size == 0:
            break
        take = idx if idx.size <= cap else idx[np.argpartition(dist[idx, j], cap - 1)[:cap]]
        assign[take] = j
        free[take] = False
    return assign


def balanced_kmeans(x: np.ndarray, k: int, iters: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Balanced k-means (OneRec): returns centroids [k, d] float32 and codes [n]."""
    n = x.shape[0]
    init = rng.choice(n, size=k, replace=n < k)
    c = x[init].astype(np.float64)
    if n < k:  # more codes than points: spread the duplicates a little
        c += 1e-3 * rng.standard_normal(c.shape) * (x.std() + 1e-6)
    assign = np.zeros(n, dtype=np.int64)
    for _ in range(max(1, iters)):
        assign = balanced_assign(_sqdist(x, c), rng)
        sums = np.zeros_like(c)
        np.add.at(sums, assign, x)
        counts = np.bincount(assign, minlength=k)
        used = counts > 0
        c[used] = sums[used] / counts[used, None]
    assign = balanced_assign(_sqdist(x, c), rng)
    return c.astype(np.float32), assign


# --------------------------------------------------------------------------------------
# residual quantisation, metrics and RQ-Kmeans+ refinement


def nearest_codes(z: np.ndarray, codebooks: Sequence[np.ndarray]) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """Greedy residual quantisation: [n, d] latents -> codes [n, L] (nearest code per
    level on the running residual) and the residual after the last level [n, d]."""
    r = np.asarray(z, dtype=np.float64)
    codes = np.zeros((r.shape[0], len(codebooks)), dtype=np.int64)
    for lvl, c in enumerate(codebooks):
        c64 = np.asarray(c, dtype=np.float64)
        j = np.argmin(_sqdist(r, c64), axis=1) if r.shape[0] else np.zeros(0, np.int64)
        codes[:, lvl] = j
        r = r - c64[j]
    return codes, r


def balanced_codes(z: np.ndarray, codebooks: Sequence[np.ndarray],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`nearest_codes` with :func:`balanced_assign` at every level (fit-time
    ids of a refined tokenizer: every code used about equally)."""
    r = np.asarray(z, dtype=np.float64)
    codes = np.zeros((r.shape[0], len(codebooks)), dtype=np.int64)
    for lvl, c in enumerate(codebooks):
        c64 = np.asarray(c, dtype=np.float64)
        j = balanced_assign(_sqdist(r, c64), rng)
        codes[:, lvl] = j
        r = r - c64[j]
    return codes, r


def code_metrics(z: np.ndarray, codes: np.ndarray, residual: np.ndarray,
                 sizes: Sequence[int]) -> dict[str, Any]:
    """Codebook quality of latents ``z`` [n, d] quantised to ``codes`` [n, L] with
    ``residual`` [n, d] left after the last level:

    * ``utilisation``: per level, the share of its codes that some item uses;
    * ``collision_rate``: share of items whose full semantic prefix (all L codes) is
      shared with another item;
    * ``reconstruction_error``: mean squared residual over mean squared norm of ``z``.
    """
    z64 = np.asarray(z, dtype=np.float64)
    return {
        "utilisation": [float(np.unique(codes[:, lvl]).size / size)
                        for lvl, size in enumerate(sizes)],
        "collision_rate": _collision_rate([tuple(int(t) for t in row) for row in codes]),
        "reconstruction_error": float((residual ** 2).sum(1).mean()
                                      / max(float((z64 ** 2).sum(1).mean()), 1e-12)),
    }


@dataclass
class ResidualMLP:
    """``y = x + W2 tanh(W1 x + b1) + b2`` on [n, d] float32 rows (numpy, for serving).
    ``w1`` [h, d], ``b1`` [h], ``w2`` [d, h], ``b2`` [d]."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        h = np.tanh(x @ self.w1.T + self.b1)
        out: np.ndarray = x + h @ self.w2.T + self.b2
        return out.astype(np.float32)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{k}": np.ascontiguousarray(getattr(self, k), dtype=np.float32)
                for k in ("w1", "b1", "w2", "b2")}

    @classmethod
    def from_arrays(cls, z: Mapping[str, np.ndarray], prefix: str) -> ResidualMLP | None:
        if f"{prefix}.w1" not in z:
            return None
        return cls(*(np.asarray(z[f"{prefix}.{k}"], dtype=np.float32)
                     for k in ("w1", "b1", "w2", "b2")))


@dataclass
class Refinement:
    """What :func:`refine_rq` returns: refined codebooks ([k_l, d] float32 each), the
    residual encoder and decoder, and per-step history (``loss``, ``recon``,
    ``commit``, ``cooc``, ``resets``: codes reset at that step)."""

    codebooks: list[np.ndarray]
    encoder: ResidualMLP
    decoder: ResidualMLP
    history: dict[str, list[float]]


def refine_rq(x: np.ndarray, codebooks: Sequence[np.ndarray], steps: int, *, seed: int = 0,
              lr: float = 1e-3, hidden: int = 128, batch: int = 1024, beta: float = 0.25,
              reset_every: int = 20, pairs: np.ndarray | None = None,
              cooc_weight: float = 0.0, temperature: float = 0.1,
              cooc_batch: int = 256, balanced: bool = True,
              reassign_every: int = 5) -> Refinement:
    """RQ-Kmeans+ (GPR [paper]: RQ-KMeans init, then the RQ-VAE loss with an
    encoder-side residual connection); the losses below are a reconstruction.

    ``x`` [n, d] content embeddings, ``codebooks`` the RQ-KMeans init ([k_l, d] each).
    Latent ``z = x + MLP_enc(x)`` (the residual connection keeps ``z`` near ``x``;
    second layer zero-initialised so step 0 reproduces the init exactly). Per level
    ``l`` the residual ``r_l`` (``r_0 = z``, ``r_{l+1} = r_l - e_l``) picks its code
    ``e_l`` -- by :func:`balanced_assign` over the batch when ``balanced`` (the same
    rule as the fit-time ids, so training optimises the ids the items will get; when the
    whole catalogue is the batch, recomputed every ``reassign_every`` steps and kept in
    between, as k-means alternates), else the nearest code (classic RQ-VAE).
    ``q = sum_l e_l`` passes to the decoder through the straight-through estimator
    ``z + sg(q - z)``, and ``x^ = q_st + MLP_dec(q_st)``. Loss::

        |x - x^|^2 + sum_l ( |sg(r_l) - e_l|^2 + beta |r_l - sg(e_l)|^2 )
            + cooc_weight * InfoNCE(pairs)

    InfoNCE (GR4AD co-occurrence learning, mechanisms.md §1.2 reconstruction): for a
    batch of co-occurring index pairs ``(a_i, b_i)`` of rows of ``x``, cosine
    similarities of the latents over ``temperature``, cross-entropy of each ``a_i``
    against every ``b_j`` in the batch (and symmetrically), the true partner the target.

    Collapse countermeasure (dead-code reset): every ``reset_every`` steps, a code that
    no item chose since the previous check is moved onto the level's current residual
    of a random item of the batch (chosen with probability proportional to its squared
    distance from the batch's mean residual, so outliers of crowded codes go first).

    Deterministic for a seed (one torch generator for initialisation and sampling;
    CPU float32).
    """
    import torch

    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    n, d = xt.shape
    gen = torch.Generator().manual_seed(int(seed))
    np_rng = np.random.default_rng(int(seed))

    def linear(fan_in: int, fan_out: int, zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.zeros(fan_out, fan_in) if zero
             else (torch.rand(fan_out, fan_in, generator=gen) * 2 - 1) * bound)
        return w.requires_grad_(), torch.zeros(fan_out).requires_grad_()

    enc = [*linear(d, hidden, False), *linear(hidden, d, True)]
    dec = [*linear(d, hidden, False), *linear(hidden, d, True)]
    cbs = [torch.tensor(np.asarray(c, dtype=np.float32)).requires_grad_() for c in codebooks]
    opt = torch.optim.Adam([*enc, *dec, *cbs], lr=lr)

    def mlp(p: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        return v + torch.tanh(v @ p[0].T + p[1]) @ p[2].T + p[3]

    pair_t = (torch.as_tensor(np.asarray(pairs, dtype=np.int64)).reshape(-1, 2)
              if pairs is not None and len(pairs) else torch.zeros(0, 2, dtype=torch.int64))
    use_cooc = cooc_weight > 0 and pair_t.shape[0] > 0
    used = [torch.zeros(c.shape[0], dtype=torch.bool) for c in cbs]
    cached: list[torch.Tensor] = []  # balanced codes per level (full-batch mode)
    hist: dict[str, list[float]] = {k: [] for k in ("loss", "recon", "commit", "cooc",
                                                    "resets")}
    for step in range(steps):
        idx = (torch.arange(n) if n <= batch
               else torch.randperm(n, generator=gen)[:batch])
        xb = xt[idx]
        z = mlp(enc, xb)
        r, q = z, torch.zeros_like(z)
        commit = z.new_zeros(())
        residuals = []
        for lvl, c in enumerate(cbs):
            with torch.no_grad():
                if not balanced:
                    j = torch.cdist(r, c).argmin(1)
                elif n <= batch and step % max(1, reassign_every) and len(cached) == len(cbs):
                    j = cached[lvl]
                else:
                    dist = torch.cdist(r, c).double().numpy() ** 2
                    j = torch.as_tensor(balanced_assign(dist, np_rng))
                    cached[lvl:] = [j]
                used[lvl][j] = True
            e = c[j]
            residuals.append(r.detach())
            commit = commit + ((r.detach() - e) ** 2).sum(1).mean() \
                + beta * ((r - e.detach()) ** 2).sum(1).mean()
            q = q + e
            r = r - e
        q_st = z + (q - z).detach()
        recon = ((xb - mlp(dec, q_st)) ** 2).sum(1).mean()
        loss = recon + commit
        cooc = z.new_zeros(())
        if use_cooc:
            sel = torch.randperm(pair_t.shape[0], generator=gen)[:cooc_batch]
            a, b = pair_t[sel, 0], pair_t[sel, 1]
            za = torch.nn.functional.normalize(mlp(enc, xt[a]), dim=1)
            zb = torch.nn.functional.normalize(mlp(enc, xt[b]), dim=1)
            logits = za @ zb.T / temperature
            target = torch.arange(a.shape[0])
            cooc = 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                          + torch.nn.functional.cross_entropy(logits.T, target))
            loss = loss + cooc_weight * cooc
        opt.zero_grad()
        loss.backward()
        opt.step()
        resets = 0
        if reset_every and (step + 1) % reset_every == 0:
            with torch.no_grad():
                for lvl, c in enumerate(cbs):
                    dead = torch.nonzero(~used[lvl]).flatten()
                    if dead.numel():
                        res = residuals[lvl]
                        w = (res - res.mean(0)).pow(2).sum(1) + 1e-12
                        pick = torch.multinomial(w, dead.numel(), replacement=True,
                                                 generator=gen)
                        c[dead] = res[pick] + 1e-3 * torch.randn(
                            dead.numel(), d, generator=gen) * res.std()
                        resets += int(dead.numel())
                    used[lvl].zero_()
        hist["loss"].append(float(loss.detach()))
        hist["recon"].append(float(recon.detach()))
        hist["commit"].append(float(commit.detach()))
        hist["cooc"].append(float(cooc.detach()))
        hist["resets"].append(float(resets))

    def np_mlp(p: list[torch.Tensor]) -> ResidualMLP:
        a = [t.detach().numpy().astype(np.float32).copy() for t in p]
        return ResidualMLP(a[0], a[1], a[2], a[3])

    return Refinement([c.detach().numpy().astype(np.float32).copy() for c in cbs],
                      np_mlp(enc), np_mlp(dec), hist)


# --------------------------------------------------------------------------------------
# the tokenizer


class UASIDTokenizer:
    """UA-SID codebooks, business vocabularies and the live id tables (both directions):
    ads (``table()``) and organic items (``organic_table()``) in one id space."""

    def __init__(self, config: TokenizerConfig, codebooks: list[np.ndarray],
                 industry: _Vocab, goal: _Vocab, version: str,
                 fit_report: dict[str, Any] | None = None,
                 encoder: ResidualMLP | None = None,
                 decoder: ResidualMLP | None = None) -> None:
        if len(codebooks) != config.semantic_levels:
            raise TokenizerError(f"{len(codebooks)} codebooks for "
                                 f"{config.semantic_levels} semantic levels")
        for lvl, (cb, size) in enumerate(zip(codebooks, config.sizes, strict=True)):
            if cb.ndim != 2 or cb.shape[0] != size:
                raise TokenizerError(f"codebook {lvl} has shape {cb.shape}, expected ({size}, d)")
        self.config = config
        self.codebooks = [np.ascontiguousarray(c, dtype=np.float32) for c in codebooks]
        self.encoder = encoder
        """Residual encoder of a refined tokenizer (None: the latent is the embedding)."""
        self.decoder = decoder
        self.industry = industry
        self.goal = goal
        self.id_space_version = version
        self.fit_report: dict[str, Any] = dict(fit_report or {})
        self._ids: dict[str, tuple[int, ...]] = {}
        self._ads: dict[tuple[int, ...], str] = {}
        self._organic_ids: dict[str, tuple[int, ...]] = {}
        self._organic: dict[tuple[int, ...], str] = {}
        self._prefix_suffixes: dict[tuple[int, ...], set[int]] = {}

    # ---- fitting (offline) ----------------------------------------------------------

    @classmethod
    def fit(cls, ads: Sequence[Any], config: TokenizerConfig | None = None,
            embeddings: np.ndarray | None = None, *,
            organic: Sequence[Any] = (), organic_embeddings: np.ndarray | None = None,
            cooc: Iterable[tuple[str, str]] = ()) -> UASIDTokenizer:
        """Fit codebooks on ``ads`` and the optional ``organic`` items (a new id space)
        and give every one of them an id.

        ``embeddings`` / ``organic_embeddings``: precomputed content embeddings [n, d]
        (else the config's encoder embeds the texts). ``cooc``: co-occurrence pairs of
        ids (ad or organic item ids: consumed or clicked by one user close in time),
        used by the refinement's InfoNCE term when ``cooc_weight > 0``; pairs naming an
        unknown id are skipped (``fit_report["cooc_pairs_used"]`` counts the rest).
        With ``refine_steps == 0`` and no organic items this is the plain RQ-KMeans fit.
        """
        infos = [ad_info(a) for a in ads]
        org = [organic_info(o) for o in organic]
        if not infos:
            raise TokenizerError("cannot fit a tokenizer on zero ads")
        if len({i.ad_id for i in infos}) != len(infos):
            raise TokenizerError("duplicate ad_id in the ads given to fit")
        if len({o.item_id for o in org}) != len(org):
            raise TokenizerError("duplicate item_id in the organic items given to fit")
        config = (config or TokenizerConfig()).resolve(len(infos) + len(org))
        x = embeddings if embeddings is not None else embed_ads(
            [i.text for i in infos], config.encoder)
        x = np.asarray(x, dtype=np.float32)
        if org:
            xo = (organic_embeddings if organic_embeddings is not None
                  else embed_ads([o.text for o in org], config.encoder))
            x = np.concatenate([x, np.asarray(xo, dtype=np.float32)])
        rng = np.random.default_rng(config.seed)
        residual = x.astype(np.float64)
        codebooks, codes = [], []
        for size in config.sizes:
            c, a = balanced_kmeans(residual, size, config.kmeans_iters, rng)
            codebooks.append(c)
            codes.append(a)
            residual = residual - c[a]
        sem = np.stack(codes, 1)  # [n, L]
        if config.assignment == "nearest":
            sem, residual = nearest_codes(x, codebooks)
        z = x
        encoder = decoder = None
        pairs = _pair_indices(cooc, [i.ad_id for i in infos], [o.item_id for o in org])
        extra: dict[str, Any] = {}
        if config.refine_steps > 0:
            x64 = x.astype(np.float64)
            extra["init_reconstruction_error"] = float(
                (residual ** 2).sum(1).mean() / max((x64 ** 2).sum(1).mean(), 1e-12))
            ref = refine_rq(x, codebooks, config.refine_steps, seed=config.seed,
                            lr=config.refine_lr, hidden=config.refine_hidden,
                            batch=config.refine_batch, beta=config.commitment_beta,
                            reset_every=config.dead_code_reset_every, pairs=pairs,
                            cooc_weight=config.cooc_weight,
                            temperature=config.cooc_temperature,
                            cooc_batch=config.cooc_batch,
                            balanced=config.assignment == "balanced")
            codebooks, encoder, decoder = ref.codebooks, ref.encoder, ref.decoder
            z = encoder(x)
            extra["refine_final_loss"] = ref.history["loss"][-1]
            extra["refine_codes_reset"] = int(sum(ref.history["resets"]))
            sem, residual = (balanced_codes(z, codebooks, rng) if config.assignment == "balanced"
                             else nearest_codes(z, codebooks))
        z64 = np.asarray(z, dtype=np.float64)
        recon_err = float((residual ** 2).sum(1).mean() / max((z64 ** 2).sum(1).mean(), 1e-12))
        q = (z64 - residual).astype(np.float32)
        x_hat = decoder(q) if decoder is not None else q
        recon_in = float(((x.astype(np.float64) - x_hat) ** 2).sum(1).mean()
                         / max(float((x.astype(np.float64) ** 2).sum(1).mean()), 1e-12))
        industry, goal = _Vocab(config.industry_size), _Vocab(config.goal_size)
        for info in infos:  # vocabularies in order of first appearance (deterministic)
            industry.token(info.industry)
            goal.token(f"{info.bid_type}/{info.conversion_goal}")
        h = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode())
        for c in codebooks:
            h.update(c.tobytes())
        for net in (encoder, decoder):
            if net is not None:
                for arr in net.arrays("").values():
                    h.update(arr.tobytes())
        h.update(json.dumps([industry.table, goal.table], sort_keys=True).encode())
        tok = cls(config, codebooks, industry, goal, "ids-" + h.hexdigest()[:16],
                  encoder=encoder, decoder=decoder)
        n_ads = len(infos)
        for info, emb, sem_codes in zip(infos, z[:n_ads], sem[:n_ads], strict=True):
            tok._assign_info(info, emb, tuple(int(s) for s in sem_codes))
        for item, emb, sem_codes in zip(org, z[n_ads:], sem[n_ads:], strict=True):
            tok._assign_organic(item, emb, tuple(int(s) for s in sem_codes))
        tok.fit_report = {
            "ads": len(infos),
            "reconstruction_error": recon_err,
            "collision_rate_semantic": _collision_rate([tok._ids[i.ad_id][:config.semantic_levels]
                                                        for i in infos]),
            "collision_rate_before_suffix": _collision_rate([tok._ids[i.ad_id][:-1]
                                                             for i in infos]),
            "codebook_utilization": [float(np.unique(sem[:, lvl]).size / s)
                                     for lvl, s in enumerate(config.sizes)],
        }
        if org or config.refine_steps > 0 or config.auto_sizes or config.assignment != "balanced":
            tok.fit_report.update({
                "organic_items": len(org),
                "reconstruction_error_input": recon_in,
                "cooc_pairs_used": len(pairs),
                **extra,
            })
        return tok

    # ---- online assignment ----------------------------------------------------------

    def latent(self, emb: np.ndarray) -> np.ndarray:
        """The vector the codebooks quantise: the content embedding ([d] or [n, d])
        through the refined encoder, or the embedding itself."""
        e = np.asarray(emb, dtype=np.float32)
        if self.encoder is None:
            return e
        return self.encoder(e[None, :])[0] if e.ndim == 1 else self.encoder(e)

    def encode_semantic(self, emb: np.ndarray) -> tuple[int, ...]:
        """Nearest code per level on the running residual of the latent of content
        embedding ``emb`` [d] (no codebook change)."""
        r = self.latent(emb)
        out = []
        for c in self.codebooks:
            j = int(np.argmin(_sqdist(r[None, :], c)[0]))
            out.append(j)
            r = r - c[j]
        return tuple(out)

    def quality(self, embeddings: np.ndarray) -> dict[str, Any]:
        """:func:`code_metrics` of content embeddings [n, d] placed as new items would
        be (latent, then nearest codes), plus ``reconstruction_error_input``: mean
        squared error of the decoded codes against the embeddings, over their mean
        squared norm (the decoder is the identity without refinement)."""
        x = np.asarray(embeddings, dtype=np.float32)
        z = self.latent(x)
        codes, res = nearest_codes(z, self.codebooks)
        out = code_metrics(z, codes, res, self.config.sizes)
        q = (np.asarray(z, dtype=np.float64) - res).astype(np.float32)
        x_hat = self.decoder(q) if self.decoder is not None else q
        x64 = x.astype(np.float64)
        out["reconstruction_error_input"] = float(
            ((x64 - x_hat) ** 2).sum(1).mean() / max(float((x64 ** 2).sum(1).mean()), 1e-12))
        return out

    def business_tokens(self, info: AdInfo, grow: bool = True) -> tuple[int, int, int]:
        return (self.industry.token(info.industry, grow),
                self.goal.token(f"{info.bid_type}/{info.conversion_goal}", grow),
                _stable_hash(info.advertiser_id) % self.config.advertiser_size)

    def organic_business_tokens(self, item: OrganicItem) -> tuple[int, int, int]:
        """The reserved "organic" value: industry and goal token 0 (never an ad's) and
        the topic's hash bucket in the advertiser slot."""
        return (ORGANIC_INDUSTRY, ORGANIC_GOAL,
                _stable_hash("organic:" + item.topic) % self.config.advertiser_size)

    def assign(self, ad: Any, embedding: np.ndarray | None = None) -> tuple[int, ...]:
        """The id of ``ad``; a new ad gets one now (nearest codes, next free suffix).
        An ad that already has an id keeps it."""
        info = ad_info(ad)
        if info.ad_id in self._ids:
            return self._ids[info.ad_id]
        emb = embedding if embedding is not None else embed_ads([info.text],
                                                                self.config.encoder)[0]
        return self._assign_info(info, self.latent(emb), self.encode_semantic(emb))

    def add_ads(self, ads: Iterable[Any]) -> dict[str, tuple[int, ...]]:
        """Assign ids to many ads at once (one embedding call for the new ones)."""
        infos = [ad_info(a) for a in ads]
        new = [i for i in infos if i.ad_id not in self._ids]
        if new:
            embs = embed_ads([i.text for i in new], self.config.encoder)
            for info, emb in zip(new, embs, strict=True):
                if info.ad_id not in self._ids:  # duplicates inside ``ads``
                    self._assign_info(info, self.latent(emb), self.encode_semantic(emb))
        return {i.ad_id: self._ids[i.ad_id] for i in infos}

    def assign_organic(self, item: Any, embedding: np.ndarray | None = None
                       ) -> tuple[int, ...]:
        """The id of an organic item (an :class:`OrganicItem`, mapping or
        ``(item_id, text[, topic])``); a new one gets it now, like a new ad: the same
        encoder and codebooks, the organic business tokens, the next free suffix."""
        info = organic_info(item)
        if info.item_id in self._organic_ids:
            return self._organic_ids[info.item_id]
        emb = embedding if embedding is not None else embed_ads([info.text],
                                                                self.config.encoder)[0]
        return self._assign_organic(info, self.latent(emb), self.encode_semantic(emb))

    def add_organic(self, items: Iterable[Any]) -> dict[str, tuple[int, ...]]:
        """Assign ids to many organic items at once (one embedding call)."""
        infos = [organic_info(o) for o in items]
        new = [i for i in infos if i.item_id not in self._organic_ids]
        if new:
            embs = embed_ads([i.text for i in new], self.config.encoder)
            for info, emb in zip(new, embs, strict=True):
                if info.item_id not in self._organic_ids:
                    self._assign_organic(info, self.latent(emb), self.encode_semantic(emb))
        return {i.item_id: self._organic_ids[i.item_id] for i in infos}

    def _assign_info(self, info: AdInfo, emb: np.ndarray,
                     sem: tuple[int, ...]) -> tuple[int, ...]:
        """``emb`` is the latent (the embedding through the encoder, if any)."""
        biz = self.business_tokens(info)
        prefix = self._free_prefix(info.ad_id, emb, sem, biz)
        return self._bind(info.ad_id, (*prefix, self._next_suffix(prefix)))

    def _assign_organic(self, item: OrganicItem, emb: np.ndarray,
                        sem: tuple[int, ...]) -> tuple[int, ...]:
        biz = self.organic_business_tokens(item)
        prefix = self._free_prefix(item.item_id, emb, sem, biz)
        return self._bind_organic(item.item_id, (*prefix, self._next_suffix(prefix)))

    def _next_suffix(self, prefix: tuple[int, ...]) -> int:
        used = self._prefix_suffixes.get(prefix, set())
        return next(s for s in range(self.config.suffix_size) if s not in used)

    def _free_prefix(self, item_id: str, latent: np.ndarray, sem: tuple[int, ...],
                     biz: tuple[int, int, int]) -> tuple[int, ...]:
        for alt in self._last_level_alternatives(latent, sem):
            prefix = (*alt, *biz)
            if len(self._prefix_suffixes.get(prefix, ())) < self.config.suffix_size:
                return prefix
        raise IdSpaceFullError(
            f"item {item_id!r}: every suffix of every last-level code under {sem[:-1]} "
            f"with business tokens {biz} is taken; refit with a larger suffix_size")

    def _last_level_alternatives(self, latent: np.ndarray,
                                 sem: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
        """``sem`` first, then the other last-level codes nearest to the residual."""
        yield sem
        r = np.asarray(latent, dtype=np.float32)
        for lvl, j in enumerate(sem[:-1]):
            r = r - self.codebooks[lvl][j]
        order = np.argsort(_sqdist(r[None, :], self.codebooks[-1])[0], kind="stable")
        for j in order:
            if int(j) != sem[-1]:
                yield (*sem[:-1], int(j))

    def _bind(self, ad_id: str, sid: tuple[int, ...]) -> tuple[int, ...]:
        self._check_sid(ad_id, sid)
        if sid in self._ads or sid in self._organic:
            raise TokenizerError(f"id {list(sid)} of ad {ad_id!r} already belongs to "
                                 f"{self._ads.get(sid) or self._organic.get(sid)!r}")
        self._ids[ad_id] = sid
        self._ads[sid] = ad_id
        self._prefix_suffixes.setdefault(sid[:-1], set()).add(sid[-1])
        return sid

    def _bind_organic(self, item_id: str, sid: tuple[int, ...]) -> tuple[int, ...]:
        self._check_sid(item_id, sid)
        if sid in self._ads or sid in self._organic:
            raise TokenizerError(f"id {list(sid)} of organic item {item_id!r} already "
                                 f"belongs to {self._ads.get(sid) or self._organic.get(sid)!r}")
        self._organic_ids[item_id] = sid
        self._organic[sid] = item_id
        self._prefix_suffixes.setdefault(sid[:-1], set()).add(sid[-1])
        return sid

    def _check_sid(self, ad_id: str, sid: Sequence[int]) -> None:
        sizes = self.config.token_sizes
        if len(sid) != len(sizes):
            raise UnknownIdError(f"ad {ad_id!r} has an id of {len(sid)} tokens, "
                                 f"this id space uses {len(sizes)}")
        for pos, (tok, size) in enumerate(zip(sid, sizes, strict=True)):
            if not 0 <= int(tok) < size:
                raise UnknownIdError(f"ad {ad_id!r} has token {tok} at position {pos}, "
                                     f"which has only {size} codes")

    # ---- lookups --------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, ad_id: object) -> bool:
        return ad_id in self._ids

    def ids_of(self, ad_id: str) -> tuple[int, ...]:
        try:
            return self._ids[ad_id]
        except KeyError:
            raise UnknownAdError(f"ad {ad_id!r} has no id in id space "
                                 f"{self.id_space_version}") from None

    def ad_of(self, sid: Sequence[int]) -> str:
        try:
            return self._ads[tuple(int(t) for t in sid)]
        except KeyError:
            raise UnknownIdError(f"id {list(sid)} belongs to no ad in id space "
                                 f"{self.id_space_version}") from None

    def organic_ids_of(self, item_id: str) -> tuple[int, ...]:
        try:
            return self._organic_ids[item_id]
        except KeyError:
            raise UnknownAdError(f"organic item {item_id!r} has no id in id space "
                                 f"{self.id_space_version}") from None

    def organic_of(self, sid: Sequence[int]) -> str:
        try:
            return self._organic[tuple(int(t) for t in sid)]
        except KeyError:
            raise UnknownIdError(f"id {list(sid)} belongs to no organic item in id space "
                                 f"{self.id_space_version}") from None

    def organic_table(self) -> dict[str, list[int]]:
        """organic item id -> id tokens, in assignment order (not servable: not in
        :meth:`table`)."""
        return {a: list(s) for a, s in self._organic_ids.items()}

    def semantic_of(self, item_id: str) -> tuple[int, ...] | None:
        """The semantic codes of an ad or organic item id (ads first), else None."""
        sid = self._ids.get(item_id) or self._organic_ids.get(item_id)
        return None if sid is None else sid[:self.config.semantic_levels]

    def prefix_agreement(self, pairs: Iterable[tuple[str, str]], levels: int = 1) -> float:
        """Share of the pairs (ad or organic ids; pairs naming an unknown id are
        skipped) whose first ``levels`` semantic codes are equal (NaN if none known)."""
        same = total = 0
        for a, b in pairs:
            sa, sb = self.semantic_of(a), self.semantic_of(b)
            if sa is None or sb is None:
                continue
            total += 1
            same += sa[:levels] == sb[:levels]
        return same / total if total else float("nan")

    def table(self) -> dict[str, list[int]]:
        """ad id -> id tokens (the manifest's ``ids``), in assignment order."""
        return {a: list(s) for a, s in self._ids.items()}

    def id_array(self) -> tuple[list[str], np.ndarray]:
        """All ad ids and their ids as int64 [n, T] (rows in assignment order)."""
        ads = list(self._ids)
        arr = np.array([self._ids[a] for a in ads], dtype=np.int64).reshape(len(ads),
                                                                             self.config.id_len)
        return ads, arr

    def check_version(self, version: str, what: str = "model") -> None:
        if version != self.id_space_version:
            raise IdSpaceMismatchError(
                f"{what} was built in id space {version!r} but the tokenizer is "
                f"{self.id_space_version!r}; re-export/retrain in one id space")

    def report(self) -> dict[str, Any]:
        """Fit-time quality (``reconstruction_error``: mean squared residual after the
        last level over the latent's mean squared norm; utilization; collision rates)
        plus the live tables: ``utilisation`` (per level, share of codes some live ad
        or organic item uses), ``collision_rate`` (share of live ads and organic items
        whose full semantic prefix is shared) and the ads' collision rates."""
        L = self.config.semantic_levels
        sids = list(self._ids.values())
        every = sids + list(self._organic_ids.values())
        return {
            **self.fit_report,
            "id_space_version": self.id_space_version,
            "live_ads": len(sids),
            "live_organic_items": len(self._organic_ids),
            "live_collision_rate_semantic": _collision_rate([s[:L] for s in sids]),
            "live_collision_rate_before_suffix": _collision_rate([s[:-1] for s in sids]),
            "max_suffix": max((s[-1] for s in sids), default=0),
            "utilisation": [len({s[lvl] for s in every}) / size
                            for lvl, size in enumerate(self.config.sizes)],
            "collision_rate": _collision_rate([s[:L] for s in every]),
            "refined": self.encoder is not None,
        }

    # ---- persistence ----------------------------------------------------------------

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` + ``codebooks.npz`` atomically (tmp + rename)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "id_space_version": self.id_space_version,
            "config": self.config.to_json(),
            "industry_vocab": self.industry.table,
            "goal_vocab": self.goal.table,
            "fit_report": self.fit_report,
            "ids": self.table(),
        }
        if self._organic_ids:
            meta["organic_ids"] = self.organic_table()
        tmp = d / "codebooks.npz.tmp"
        arrays: dict[str, Any] = {f"level_{i}": c for i, c in enumerate(self.codebooks)}
        for name, net in (("encoder", self.encoder), ("decoder", self.decoder)):
            if net is not None:
                arrays.update(net.arrays(name))
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, d / "codebooks.npz")
        tmp = d / "tokenizer.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))  # ids keep their assignment order
        os.replace(tmp, d / "tokenizer.json")
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> UASIDTokenizer:
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            raise TokenizerError(f"no tokenizer.json in {d}")
        meta = json.loads((d / "tokenizer.json").read_text())
        if meta.get("format") != FORMAT:
            raise TokenizerError(f"tokenizer format {meta.get('format')} not supported "
                                 f"(reads {FORMAT})")
        config = TokenizerConfig.from_json(meta["config"])
        with np.load(d / "codebooks.npz") as z:
            codebooks = [z[f"level_{i}"] for i in range(config.semantic_levels)]
            arrays = {k: z[k] for k in z.files}
        tok = cls(config, codebooks, _Vocab(config.industry_size, dict(meta["industry_vocab"])),
                  _Vocab(config.goal_size, dict(meta["goal_vocab"])), meta["id_space_version"],
                  meta.get("fit_report"), encoder=ResidualMLP.from_arrays(arrays, "encoder"),
                  decoder=ResidualMLP.from_arrays(arrays, "decoder"))
        for ad_id, sid in meta["ids"].items():
            tok._bind(ad_id, tuple(int(t) for t in sid))
        for item_id, sid in meta.get("organic_ids", {}).items():
            tok._bind_organic(item_id, tuple(int(t) for t in sid))
        return tok


def _collision_rate(sids: Sequence[tuple[int, ...]]) -> float:
    """Fraction of ads whose (partial) id is shared with at least one other ad."""
    if not sids:
        return 0.0
    counts: dict[tuple[int, ...], int] = {}
    for s in sids:
        counts[s] = counts.get(s, 0) + 1
    return sum(c for c in counts.values() if c > 1) / len(sids)


def _pair_indices(pairs: Iterable[tuple[str, str]], ad_ids: Sequence[str],
                  organic_ids: Sequence[str]) -> np.ndarray:
    """Co-occurrence pairs of ids -> int64 [m, 2] row indices into the fit matrix (ads
    first, then organic items); pairs naming an unknown id or one item twice are
    skipped."""
    index = {a: i for i, a in enumerate(ad_ids)}
    for j, o in enumerate(organic_ids):
        index.setdefault(o, len(ad_ids) + j)
    rows = [(index[a], index[b]) for a, b in pairs
            if a in index and b in index and index[a] != index[b]]
    return np.array(rows, dtype=np.int64).reshape(-1, 2)
