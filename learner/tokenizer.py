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
version) and ``codebooks.npz`` (float32 centroids), which round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from learner.embeddings import DEFAULT_ENCODER, ad_text, embed_ads

FORMAT = 1
BUSINESS_FIELDS = ("industry", "bid_type", "conversion_goal", "advertiser_id")


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
    level_sizes: tuple[int, ...] = (256, 256, 256)
    """Codebook size per semantic level (coarse to fine)."""
    industry_size: int = 32
    goal_size: int = 16
    """Vocabulary of (bid type, conversion goal) pairs."""
    advertiser_size: int = 32
    """Advertiser ids are hashed into this many buckets."""
    suffix_size: int = 32
    kmeans_iters: int = 12
    seed: int = 0
    encoder: str = DEFAULT_ENCODER

    def __post_init__(self) -> None:
        sizes = (*self.level_sizes, self.industry_size, self.goal_size,
                 self.advertiser_size, self.suffix_size)
        if not self.level_sizes or any(int(s) < 1 for s in sizes):
            raise TokenizerError(f"every vocabulary size must be >= 1, got {sizes}")
        if self.industry_size < 2 or self.goal_size < 2:
            raise TokenizerError("industry_size and goal_size need >= 2 (0 means 'other')")

    @property
    def semantic_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def token_sizes(self) -> tuple[int, ...]:
        """Vocabulary size of every id position, semantic levels first (``level_sizes``
        in the snapshot manifest)."""
        return (*self.level_sizes, self.industry_size, self.goal_size,
                self.advertiser_size, self.suffix_size)

    @property
    def id_len(self) -> int:
        return len(self.token_sizes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["level_sizes"] = list(self.level_sizes)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TokenizerConfig:
        d = dict(d)
        d["level_sizes"] = tuple(int(s) for s in d["level_sizes"])
        return cls(**d)


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
# the tokenizer


class UASIDTokenizer:
    """UA-SID codebooks, business vocabularies and the live id table (both directions)."""

    def __init__(self, config: TokenizerConfig, codebooks: list[np.ndarray],
                 industry: _Vocab, goal: _Vocab, version: str,
                 fit_report: dict[str, Any] | None = None) -> None:
        if len(codebooks) != config.semantic_levels:
            raise TokenizerError(f"{len(codebooks)} codebooks for "
                                 f"{config.semantic_levels} semantic levels")
        for lvl, (cb, size) in enumerate(zip(codebooks, config.level_sizes, strict=True)):
            if cb.ndim != 2 or cb.shape[0] != size:
                raise TokenizerError(f"codebook {lvl} has shape {cb.shape}, expected ({size}, d)")
        self.config = config
        self.codebooks = [np.ascontiguousarray(c, dtype=np.float32) for c in codebooks]
        self.industry = industry
        self.goal = goal
        self.id_space_version = version
        self.fit_report: dict[str, Any] = dict(fit_report or {})
        self._ids: dict[str, tuple[int, ...]] = {}
        self._ads: dict[tuple[int, ...], str] = {}
        self._prefix_suffixes: dict[tuple[int, ...], set[int]] = {}

    # ---- fitting (offline) ----------------------------------------------------------

    @classmethod
    def fit(cls, ads: Sequence[Any], config: TokenizerConfig | None = None,
            embeddings: np.ndarray | None = None) -> UASIDTokenizer:
        """Fit codebooks on ``ads`` (a new id space) and give every ad an id."""
        config = config or TokenizerConfig()
        infos = [ad_info(a) for a in ads]
        if not infos:
            raise TokenizerError("cannot fit a tokenizer on zero ads")
        if len({i.ad_id for i in infos}) != len(infos):
            raise TokenizerError("duplicate ad_id in the ads given to fit")
        x = embeddings if embeddings is not None else embed_ads(
            [i.text for i in infos], config.encoder)
        x = np.asarray(x, dtype=np.float32)
        rng = np.random.default_rng(config.seed)
        residual = x.astype(np.float64)
        codebooks, codes = [], []
        for size in config.level_sizes:
            c, a = balanced_kmeans(residual, size, config.kmeans_iters, rng)
            codebooks.append(c)
            codes.append(a)
            residual = residual - c[a]
        recon_err = float((residual ** 2).sum(1).mean() / max((x.astype(np.float64) ** 2)
                                                               .sum(1).mean(), 1e-12))
        industry, goal = _Vocab(config.industry_size), _Vocab(config.goal_size)
        for info in infos:  # vocabularies in order of first appearance (deterministic)
            industry.token(info.industry)
            goal.token(f"{info.bid_type}/{info.conversion_goal}")
        h = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode())
        for c in codebooks:
            h.update(c.tobytes())
        h.update(json.dumps([industry.table, goal.table], sort_keys=True).encode())
        tok = cls(config, codebooks, industry, goal, "ids-" + h.hexdigest()[:16])
        sem = np.stack(codes, 1)  # [n, L]
        for info, emb, sem_codes in zip(infos, x, sem, strict=True):
            tok._assign_info(info, emb, tuple(int(s) for s in sem_codes))
        tok.fit_report = {
            "ads": len(infos),
            "reconstruction_error": recon_err,
            "collision_rate_semantic": _collision_rate([tok._ids[i.ad_id][:config.semantic_levels]
                                                        for i in infos]),
            "collision_rate_before_suffix": _collision_rate([tok._ids[i.ad_id][:-1]
                                                             for i in infos]),
            "codebook_utilization": [float(np.unique(a).size / s)
                                     for a, s in zip(codes, config.level_sizes, strict=True)],
        }
        return tok

    # ---- online assignment ----------------------------------------------------------

    def encode_semantic(self, emb: np.ndarray) -> tuple[int, ...]:
        """Nearest code per level on the running residual (no codebook change)."""
        r = np.asarray(emb, dtype=np.float32)
        out = []
        for c in self.codebooks:
            j = int(np.argmin(_sqdist(r[None, :], c)[0]))
            out.append(j)
            r = r - c[j]
        return tuple(out)

    def business_tokens(self, info: AdInfo, grow: bool = True) -> tuple[int, int, int]:
        return (self.industry.token(info.industry, grow),
                self.goal.token(f"{info.bid_type}/{info.conversion_goal}", grow),
                _stable_hash(info.advertiser_id) % self.config.advertiser_size)

    def assign(self, ad: Any, embedding: np.ndarray | None = None) -> tuple[int, ...]:
        """The id of ``ad``; a new ad gets one now (nearest codes, next free suffix).
        An ad that already has an id keeps it."""
        info = ad_info(ad)
        if info.ad_id in self._ids:
            return self._ids[info.ad_id]
        emb = embedding if embedding is not None else embed_ads([info.text],
                                                                self.config.encoder)[0]
        return self._assign_info(info, emb, self.encode_semantic(emb))

    def add_ads(self, ads: Iterable[Any]) -> dict[str, tuple[int, ...]]:
        """Assign ids to many ads at once (one embedding call for the new ones)."""
        infos = [ad_info(a) for a in ads]
        new = [i for i in infos if i.ad_id not in self._ids]
        if new:
            embs = embed_ads([i.text for i in new], self.config.encoder)
            for info, emb in zip(new, embs, strict=True):
                if info.ad_id not in self._ids:  # duplicates inside ``ads``
                    self._assign_info(info, emb, self.encode_semantic(emb))
        return {i.ad_id: self._ids[i.ad_id] for i in infos}

    def _assign_info(self, info: AdInfo, emb: np.ndarray,
                     sem: tuple[int, ...]) -> tuple[int, ...]:
        biz = self.business_tokens(info)
        for alt in self._last_level_alternatives(emb, sem):
            prefix = (*alt, *biz)
            used = self._prefix_suffixes.setdefault(prefix, set())
            if len(used) < self.config.suffix_size:
                suffix = next(s for s in range(self.config.suffix_size) if s not in used)
                return self._bind(info.ad_id, (*prefix, suffix))
        raise IdSpaceFullError(
            f"ad {info.ad_id!r}: every suffix of every last-level code under {sem[:-1]} "
            f"with business tokens {biz} is taken; refit with a larger suffix_size")

    def _last_level_alternatives(self, emb: np.ndarray,
                                 sem: tuple[int, ...]) -> Iterable[tuple[int, ...]]:
        """``sem`` first, then the other last-level codes nearest to the residual."""
        yield sem
        r = np.asarray(emb, dtype=np.float32)
        for lvl, j in enumerate(sem[:-1]):
            r = r - self.codebooks[lvl][j]
        order = np.argsort(_sqdist(r[None, :], self.codebooks[-1])[0], kind="stable")
        for j in order:
            if int(j) != sem[-1]:
                yield (*sem[:-1], int(j))

    def _bind(self, ad_id: str, sid: tuple[int, ...]) -> tuple[int, ...]:
        self._check_sid(ad_id, sid)
        if sid in self._ads:
            raise TokenizerError(f"id {list(sid)} of ad {ad_id!r} already belongs to "
                                 f"ad {self._ads[sid]!r}")
        self._ids[ad_id] = sid
        self._ads[sid] = ad_id
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
        """Fit-time quality (reconstruction error, utilization, collision rates) plus the
        live table's collision rate before the suffix."""
        L = self.config.semantic_levels
        sids = list(self._ids.values())
        return {
            **self.fit_report,
            "id_space_version": self.id_space_version,
            "live_ads": len(sids),
            "live_collision_rate_semantic": _collision_rate([s[:L] for s in sids]),
            "live_collision_rate_before_suffix": _collision_rate([s[:-1] for s in sids]),
            "max_suffix": max((s[-1] for s in sids), default=0),
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
        tmp = d / "codebooks.npz.tmp"
        arrays: dict[str, Any] = {f"level_{i}": c for i, c in enumerate(self.codebooks)}
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
        tok = cls(config, codebooks, _Vocab(config.industry_size, dict(meta["industry_vocab"])),
                  _Vocab(config.goal_size, dict(meta["goal_vocab"])), meta["id_space_version"],
                  meta.get("fit_report"))
        for ad_id, sid in meta["ids"].items():
            tok._bind(ad_id, tuple(int(t) for t in sid))
        return tok


def _collision_rate(sids: Sequence[tuple[int, ...]]) -> float:
    """Fraction of ads whose (partial) id is shared with at least one other ad."""
    if not sids:
        return 0.0
    counts: dict[tuple[int, ...], int] = {}
    for s in sids:
        counts[s] = counts.get(s, 0) + 1
    return sum(c for c in counts.values() if c > 1) / len(sids)
