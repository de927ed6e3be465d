"""The snapshot contract between the learner and the server (docs/snapshot-format.md).

One small module both sides import, so neither imports the other: the format version,
the files and tensor names a snapshot has, ``manifest.json`` parsing and validation, and
the ONNX Runtime session options every snapshot graph is run with (the learner's export
checks and the server's sessions alike).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

REQUIRED_FILES = ("encoder.onnx", "decoder_step.onnx", "value.onnx")
FORMAT = 4
"""The snapshot format the learner writes and the server reads. 4: ``value.onnx`` (the
ranking decoder) also takes the encoder's ``memory_kv`` (KV pass-through); a graph may
leave out an input it does not read (callers feed only the inputs a graph declares,
:func:`declared_feeds`). 3: the encoder's
``context`` input is ``[B, C + O]``: C context feature ids then ``organic_len`` (O)
hashed organic topic ids, most recent first, 0 = none
(:func:`streams.features.request_ids`); the manifest names ``organic_len``. 2:
``encoder.onnx`` also outputs the top blocks' memory keys/values, ``decoder_step.onnx``
takes per-request states plus ``beam_request``. Formats 1 and 2 are refused: re-export
such a checkpoint; format 3 is refused likewise."""
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\.(onnx|json)$")
MAX_MANIFEST_BYTES = 512 * 1024 * 1024


class SnapshotRejectedError(Exception):
    """A snapshot that must not be served; ``step`` names where it failed
    (fetch, checksum, manifest, load, warmup, nan, parity)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` the server uses (``raw`` keeps everything)."""

    version: str
    model_name: str
    parent: str | None
    id_space_version: str
    level_sizes: tuple[int, ...]
    history_len: int
    context_features: tuple[str, ...]
    context_buckets: int
    organic_len: int
    """Organic topic ids after the context feature ids in the ``context`` input."""
    files: dict[str, dict[str, Any]]
    ad_ids: list[str]
    ids: np.ndarray            # [n, T] int64, rows in ``ad_ids`` order
    organic_ids: list[str]
    """Organic items (videos, articles) in the same id space, servable in a mixed feed."""
    organic_table: np.ndarray  # [m, T] int64, rows in ``organic_ids`` order
    parity: dict[str, Any]
    raw: dict[str, Any]

    @property
    def id_len(self) -> int:
        return len(self.level_sizes)


def parse_manifest(data: bytes) -> Manifest:
    """Validate and parse ``manifest.json`` bytes (raises :class:`SnapshotRejectedError`)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotRejectedError("manifest", f"manifest.json is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SnapshotRejectedError("manifest", "manifest.json is not an object")
    try:
        if raw.get("format") != FORMAT:
            raise ValueError(f"snapshot format {raw.get('format')!r} not supported: this "
                             f"server reads format {FORMAT} only (format 4 gives the ranking "
                             "decoder the generator's cached keys/values; re-export the "
                             "checkpoint with this version's adloop export)")
        level_sizes = tuple(int(s) for s in raw["level_sizes"])
        if not level_sizes or min(level_sizes) < 1:
            raise ValueError("level_sizes must be a non-empty list of sizes >= 1")
        files = raw["files"]
        if not isinstance(files, dict):
            raise ValueError("files must be an object")
        for name, meta in files.items():
            if not _SAFE_NAME.match(name) or name == "manifest.json":
                raise ValueError(f"file name {name!r} not allowed (plain .onnx/.json only)")
            if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
                raise ValueError(f"files[{name!r}] needs a sha256")
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise ValueError(f"files misses {missing}")
        id_table = raw["ids"]
        if not isinstance(id_table, dict):
            raise ValueError("ids must be an object ad id -> id")
        ad_ids, ids = _id_table(id_table, level_sizes, "ids", "ad id")
        organic = raw.get("organic_ids") or {}
        if not isinstance(organic, dict):
            raise ValueError("organic_ids must be an object item id -> id")
        organic_ids, organic_table = _id_table(organic, level_sizes, "organic_ids",
                                               "organic item id")
        if set(organic_ids) & set(ad_ids):
            raise ValueError("an id is both an ad and an organic item: "
                             f"{sorted(set(organic_ids) & set(ad_ids))[:3]}")
        return Manifest(
            version=str(raw["version"]), model_name=str(raw.get("model_name", "")),
            parent=raw.get("parent"), id_space_version=str(raw.get("id_space_version", "")),
            level_sizes=level_sizes, history_len=int(raw["history_len"]),
            context_features=tuple(str(f) for f in raw["context_features"]),
            context_buckets=int(raw["context_buckets"]), organic_len=int(raw["organic_len"]),
            files=files, ad_ids=ad_ids, ids=ids, organic_ids=organic_ids,
            organic_table=organic_table,
            parity=raw.get("parity") or {}, raw=raw)
    except SnapshotRejectedError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotRejectedError("manifest", f"manifest.json: {exc!r}") from None


def _id_table(table: dict[str, Any], level_sizes: tuple[int, ...], field: str,
              what: str) -> tuple[list[str], np.ndarray]:
    """(item ids, [n, T] int64 ids) of a manifest id table, each code checked against its
    level's size."""
    keys = list(table)
    T = len(level_sizes)
    if not keys:
        return keys, np.zeros((0, T), dtype=np.int64)
    ids = np.array([table[k] for k in keys], dtype=np.int64)
    if ids.shape != (len(keys), T):
        raise ValueError(f"{field}: every {what} needs {T} codes")
    if (ids < 0).any() or (ids >= np.array(level_sizes)).any():
        raise ValueError(f"{field}: an id has a code outside its level's size")
    return keys, ids


MODEL_IO = {
    "encoder": (("history", "history_mask", "context"),
                ("memory", "memory_mask", "lower", "memory_kv")),
    "decoder_step": (("memory_kv", "memory_mask", "lower", "beam_request", "prefix"),
                     ("logits",)),
    "value": (("memory", "memory_mask", "memory_kv", "candidates", "context", "exposure"),
              ("pctr", "pcvr")),
}
"""Tensor names of snapshot format 4 (docs/snapshot-format.md); ``context`` is
``[B, len(context_features) + organic_len]``. Every output is required; an input may be
absent from a graph that does not read it (e.g. ``value.onnx`` without KV pass-through
has no ``memory_kv``; ``value.onnx`` reads ``context``, the encoder's input, only
when its value head has wide crossed terms; ``exposure`` float32 [B, C], how often the
user has been shown each candidate before, only when its value head has the exposure
term: snapshots written before it existed do not declare it and are fed nothing), and
a graph may declare no input outside these."""


def declared_feeds(session: ort.InferenceSession, feeds: dict[str, Any]) -> dict[str, Any]:
    """``feeds`` restricted to the inputs ``session``'s graph declares."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feeds.items() if k in names}

PRIOR_LOG_MIX = "prior_log_mix"
"""Optional tensor of format 4, in both graphs or in neither: a model with prior heads
has ``encoder.onnx`` output each request's log mixture over its L leaf prior heads
``prior_log_mix`` float32 [B, L] and ``decoder_step.onnx`` take it (one row per request,
looked up by ``beam_request`` like the other per-request inputs). Snapshots without
prior heads (all earlier ones) have neither."""


def model_io(name: str, prior: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of graph ``name`` (a :data:`MODEL_IO` key), with the
    optional :data:`PRIOR_LOG_MIX` when ``prior``."""
    ins, outs = MODEL_IO[name]
    if prior and name == "encoder":
        outs = (*outs, PRIOR_LOG_MIX)
    if prior and name == "decoder_step":
        ins = (*ins, PRIOR_LOG_MIX)
    return ins, outs


def session_options(threads: int = 0) -> ort.SessionOptions:
    """ONNX Runtime session options for the snapshot graphs (the server's and the
    learner's checks alike): every graph optimization, ``threads`` intra-op threads (0 =
    onnxruntime's default), no busy-waiting between runs (the beam search does other
    work between steps; spinning threads would steal those cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
