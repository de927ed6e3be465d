"""Tiny but real snapshots for tests and benchmarks, built with ``onnx.helper`` + numpy.

:func:`build_snapshot` writes a directory that satisfies ``docs/snapshot-format.md``
(file names, tensor names and shapes, manifest keys, parity references computed
with onnxruntime), so the server code that loads it is the code that loads the
learner's export. The models are small stand-ins: the encoder sums per-level
embeddings of the history ids and context embeddings into ``memory`` and passes it on as
both keys and values of one top block with one head (``memory_kv`` [B, 1, 2, 1, S, D]);
the decoder step gathers each beam's request states (``beam_request``), attends from
(lower state of level P + prefix embedding) over them, runs an MLP and projects to
``V_max`` logits (entries beyond the level's size are -1e9);
the value heads are sigmoids of a bilinear user x candidate score.

Faults for tests: ``nan`` (logits contain NaN), ``corrupt`` (a file is garbage but
its checksum matches), ``bad_checksum`` (a file changes after the manifest was
written), ``parity_fail`` (the manifest's references are off).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from snapshot_format import FORMAT, sha256_hex
from streams.features import DEFAULT_CONTEXT_BUCKETS, DEFAULT_CONTEXT_FEATURES
from streams.schemas import Ad, ModelUpdate
from streams.signing import sign_update

OPSET = 17
F, I64 = TensorProto.FLOAT, TensorProto.INT64

TEST_KEY_ID = "test-1"
TEST_SECRET = b"adloop-tests-model-updates-key-1"
TEST_KEYRING = f"{TEST_KEY_ID}:{TEST_SECRET.decode()}"
"""The keyring the server fixtures verify with and :meth:`BuiltSnapshot.model_update`
signs with (tests only; a deployment's keys come from its secret store)."""


@dataclass
class SnapshotSpec:
    version: str = "v000001"
    parent: str | None = None
    model_name: str = "adloop"
    level_sizes: Sequence[int] = (8, 8, 4)
    n_ads: int = 40
    ad_ids: Sequence[str] | None = None
    """Ad ids of the id table (default ``ad-0000``...); ``n_ads`` is ignored if given."""
    d_model: int = 16
    mlp_hidden: int = 32
    history_len: int = 8
    context_features: Sequence[str] = DEFAULT_CONTEXT_FEATURES
    context_buckets: int = DEFAULT_CONTEXT_BUCKETS
    organic_len: int = 4
    """Organic topic ids after the context ids in the encoder's ``context`` input."""
    seed: int = 0
    id_seed: int = 0
    """Seed of the id table: keep it fixed across versions of one id space."""
    extra_ad_ids: Sequence[str] = ()
    """Ads placed after the others (as the learner's tokenizer places new ads): appended
    to the id table with ids no other ad has, the others keeping theirs."""
    data_watermark: float = 0.0
    organic_ids: Sequence[str] = ()
    """Organic item ids of the manifest's ``organic_ids`` (none by default). With them, the
    level-0 code ``level_sizes[0] - 1`` is reserved for organic items (no ad has it), as
    the learner's tokenizer reserves business token 0."""
    nan: bool = False
    nan_organic: bool = False
    """The decoder step gives NaN logits for beams whose prefix holds the organic level-0
    code (only an organic search meets them)."""
    corrupt: str | None = None
    bad_checksum: str | None = None
    parity_fail: bool = False
    parity_layout: str = "per_file"   # as learner.export writes; or "short_names", "flat"
    format: int = FORMAT
    """Manifest ``format`` (tests of the refusal of other formats change it)."""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltSnapshot:
    directory: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    spec: SnapshotSpec

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def ids(self) -> dict[str, list[int]]:
        ids: dict[str, list[int]] = self.manifest["ids"]
        return ids

    def model_update(self, uri: str | None = None, sha256: str | None = None, *,
                     key: tuple[str, bytes] | None = (TEST_KEY_ID, TEST_SECRET)
                     ) -> ModelUpdate:
        """The ``model-updates`` record announcing this snapshot, signed with ``key``
        (key id, secret) as the learner signs it; ``key=None``: unsigned."""
        update = ModelUpdate(
            model_name=self.spec.model_name, version=self.version, parent=self.spec.parent,
            sha256=sha256 or self.manifest_sha256, uri=uri or self.directory.as_uri(),
            id_space_version=str(self.manifest["id_space_version"]),
            data_watermark=self.spec.data_watermark, created_time=time.time(),
            metrics=dict(self.spec.metrics))
        return update if key is None else sign_update(update, *key)


def make_id_table(ad_ids: Sequence[str], level_sizes: Sequence[int],
                  seed: int = 0) -> dict[str, list[int]]:
    """Distinct random full ids (the last level acts as a collision suffix)."""
    rng = np.random.default_rng(seed)
    capacity = int(np.prod(level_sizes))
    if len(ad_ids) > capacity:
        raise ValueError(f"{len(ad_ids)} ads do not fit in {capacity} ids")
    flat = rng.choice(capacity, size=len(ad_ids), replace=False)
    ids = np.stack(np.unravel_index(flat, tuple(level_sizes)), axis=1)
    return {a: [int(x) for x in row] for a, row in zip(ad_ids, ids, strict=True)}


def make_ads(ad_ids: Sequence[str], *, seed: int = 0, event_time: float = 0.0,
             status: str = "active", budget: float = 100.0) -> list[Ad]:
    """Active ads with mixed bid types for the catalog (``ads`` topic)."""
    rng = np.random.default_rng(seed)
    kinds = ("cpc", "cpa", "cpm")
    ads = []
    for i, a in enumerate(ad_ids):
        kind = kinds[i % 3]
        bid = float(np.round(rng.uniform(0.2, 2.0) * (20 if kind == "cpa" else 1)
                             * (500 if kind == "cpm" else 1), 2))
        ads.append(Ad(ad_id=a, advertiser_id=f"adv-{i % 7}", industry="retail", bid_type=kind,  # type: ignore[arg-type]
                      conversion_goal="purchase", bid=bid, budget=budget, title=f"Ad {a}",
                      description=f"offer {i}", status=status, created_time=event_time,  # type: ignore[arg-type]
                      event_time=event_time))
    return ads


# -- graphs -----------------------------------------------------------------------------
def _init(name: str, arr: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(arr, name)


def _model(nodes: list[Any], name: str, inputs: list[Any], outputs: list[Any],
           inits: list[TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="adloop-server-testing")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _user_nodes(prefix: str) -> list[Any]:
    """memory [B,S,D], memory_mask [B,S] -> {prefix}user [B,D] (masked mean)."""
    return [
        helper.make_node("Unsqueeze", ["memory_mask", "ax2"], [f"{prefix}m3"]),
        helper.make_node("Mul", ["memory", f"{prefix}m3"], [f"{prefix}mm"]),
        helper.make_node("ReduceSum", [f"{prefix}mm", "ax1"], [f"{prefix}num"], keepdims=0),
        helper.make_node("ReduceSum", ["memory_mask", "ax1"], [f"{prefix}den0"], keepdims=1),
        helper.make_node("Add", [f"{prefix}den0", "eps"], [f"{prefix}den"]),
        helper.make_node("Div", [f"{prefix}num", f"{prefix}den"], [f"{prefix}user"]),
    ]


def _graphs(spec: SnapshotSpec, rng: np.random.Generator) -> dict[str, onnx.ModelProto]:
    sizes = list(spec.level_sizes)
    T, D, Hd = len(sizes), spec.d_model, spec.mlp_hidden
    V = max(sizes)
    C = len(spec.context_features) + spec.organic_len
    off = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def w(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * scale / np.sqrt(shape[0])).astype(np.float32)

    emb = w(int(sum(sizes)), D, scale=float(np.sqrt(sum(sizes))) * 0.5)
    if spec.nan_organic:
        emb[sizes[0] - 1] = np.nan        # the organic level-0 code (SnapshotSpec.organic_ids)
    common = [_init("off", off), _init("emb", emb), _init("ax1", np.array([1], np.int64)),
              _init("ax2", np.array([2], np.int64))]
    eps = _init("eps", np.array(1e-6, np.float32))

    # encoder
    enc_nodes = [
        helper.make_node("Add", ["history", "off"], ["hidx"]),
        helper.make_node("Gather", ["emb", "hidx"], ["hemb"]),
        helper.make_node("ReduceSum", ["hemb", "ax2"], ["item"], keepdims=0),
        helper.make_node("Gather", ["cemb_w", "context"], ["cemb"]),
        helper.make_node("Concat", ["item", "cemb"], ["cat"], axis=1),
        helper.make_node("MatMul", ["cat", "wm"], ["catw"]),
        helper.make_node("Tanh", ["catw"], ["memory"]),
        helper.make_node("GreaterOrEqual", ["context", "zero_i"], ["cpos"]),
        helper.make_node("Cast", ["cpos"], ["cmask"], to=F),
        helper.make_node("Concat", ["history_mask", "cmask"], ["memory_mask"], axis=1),
        *_user_nodes("e_"),
        helper.make_node("Unsqueeze", ["e_user", "ax1"], ["u3"]),
        helper.make_node("Add", ["u3", "q"], ["lq"]),
        helper.make_node("Tanh", ["lq"], ["lower"]),
        helper.make_node("Unsqueeze", ["memory", "ax123"], ["mem6"]),   # [B, 1, 1, 1, S, D]
        helper.make_node("Concat", ["mem6", "mem6"], ["memory_kv"], axis=2),
    ]
    encoder = _model(
        enc_nodes, "encoder",
        [helper.make_tensor_value_info("history", I64, ["B", "H", T]),
         helper.make_tensor_value_info("history_mask", F, ["B", "H"]),
         helper.make_tensor_value_info("context", I64, ["B", C])],
        [helper.make_tensor_value_info("memory", F, ["B", "S", D]),
         helper.make_tensor_value_info("memory_mask", F, ["B", "S"]),
         helper.make_tensor_value_info("lower", F, ["B", T, D]),
         helper.make_tensor_value_info("memory_kv", F, ["B", 1, 2, 1, "S", D])],
        [*common, eps, _init("cemb_w", w(spec.context_buckets, D, scale=8.0)), _init("wm", w(D, D)),
         _init("zero_i", np.array(0, np.int64)), _init("q", w(T, D, scale=4.0)),
         _init("ax123", np.array([1, 2, 3], np.int64))])

    # decoder step
    level_bias = np.zeros((T, V), np.float32)
    for t, s in enumerate(sizes):
        level_bias[t, s:] = -1e9
    nan_bias = np.zeros(V, np.float32)
    if spec.nan:
        nan_bias[0] = np.nan
    dec_nodes = [
        # each beam's request states: [B, ...] -> [N, ...]
        helper.make_node("Gather", ["memory_kv", "beam_request"], ["kvN"], axis=0),
        helper.make_node("Gather", ["kvN", "zero_s"], ["kvN0"], axis=1),    # top block 0
        helper.make_node("Gather", ["kvN0", "zero_s"], ["kN1"], axis=1),    # keys
        helper.make_node("Gather", ["kvN0", "one_s"], ["vN1"], axis=1),     # values
        helper.make_node("Gather", ["kN1", "zero_s"], ["keysN"], axis=1),   # head 0: [N, S, D]
        helper.make_node("Gather", ["vN1", "zero_s"], ["valsN"], axis=1),
        helper.make_node("Gather", ["memory_mask", "beam_request"], ["mmaskN"], axis=0),
        helper.make_node("Gather", ["lower", "beam_request"], ["lowerN"], axis=0),
        helper.make_node("Shape", ["prefix"], ["pshape"]),
        helper.make_node("Slice", ["pshape", "ax1", "two"], ["P1"]),
        helper.make_node("Gather", ["lowerN", "P1"], ["lowP3"], axis=1),
        helper.make_node("Squeeze", ["lowP3", "ax1"], ["lowP"]),
        helper.make_node("Slice", ["off", "zero1", "P1"], ["offP"]),
        helper.make_node("Add", ["prefix", "offP"], ["pidx"]),
        helper.make_node("Gather", ["emb", "pidx"], ["pemb"]),
        helper.make_node("ReduceSum", ["pemb", "ax1"], ["psum"], keepdims=0),
        helper.make_node("MatMul", ["psum", "wp"], ["pw"]),
        helper.make_node("Add", ["lowP", "pw"], ["h0"]),
        helper.make_node("Tanh", ["h0"], ["h"]),
        helper.make_node("Unsqueeze", ["h", "ax2"], ["h3"]),
        helper.make_node("MatMul", ["keysN", "h3"], ["sc3"]),
        helper.make_node("Squeeze", ["sc3", "ax2"], ["sc"]),
        helper.make_node("Sub", ["mmaskN", "one"], ["mneg"]),
        helper.make_node("Mul", ["mneg", "big"], ["mpen"]),
        helper.make_node("Add", ["sc", "mpen"], ["scm"]),
        helper.make_node("Softmax", ["scm"], ["att"], axis=1),
        helper.make_node("Unsqueeze", ["att", "ax1"], ["att3"]),
        helper.make_node("MatMul", ["att3", "valsN"], ["ctx3"]),
        helper.make_node("Squeeze", ["ctx3", "ax1"], ["ctx"]),
        helper.make_node("Add", ["h", "ctx"], ["z"]),
        helper.make_node("MatMul", ["z", "w1"], ["z1"]),
        helper.make_node("Add", ["z1", "b1"], ["z1b"]),
        helper.make_node("Relu", ["z1b"], ["z1r"]),
        helper.make_node("MatMul", ["z1r", "w2"], ["z2"]),
        helper.make_node("Add", ["z", "z2"], ["z3"]),
        helper.make_node("Tanh", ["z3"], ["hid"]),
        helper.make_node("MatMul", ["hid", "wo"], ["lg0"]),
        helper.make_node("Gather", ["level_bias", "P1"], ["lb"]),
        helper.make_node("Add", ["lg0", "lb"], ["lg1"]),
        helper.make_node("Add", ["lg1", "nan_bias"], ["logits"]),
    ]
    decoder = _model(
        dec_nodes, "decoder_step",
        [helper.make_tensor_value_info("memory_kv", F, ["B", 1, 2, 1, "S", D]),
         helper.make_tensor_value_info("memory_mask", F, ["B", "S"]),
         helper.make_tensor_value_info("lower", F, ["B", T, D]),
         helper.make_tensor_value_info("beam_request", I64, ["N"]),
         helper.make_tensor_value_info("prefix", I64, ["N", "P"])],
        [helper.make_tensor_value_info("logits", F, ["N", V])],
        [*common, _init("two", np.array([2], np.int64)), _init("zero1", np.array([0], np.int64)),
         _init("zero_s", np.array(0, np.int64)), _init("one_s", np.array(1, np.int64)),
         _init("wp", w(D, D)), _init("one", np.array(1.0, np.float32)),
         _init("big", np.array(1e9, np.float32)), _init("w1", w(D, Hd)),
         _init("b1", np.zeros(Hd, np.float32)), _init("w2", w(Hd, D)),
         _init("wo", w(D, V, scale=3.0)), _init("level_bias", level_bias),
         _init("nan_bias", nan_bias)])

    # value heads
    val_nodes = [
        *_user_nodes("v_"),
        helper.make_node("Add", ["candidates", "off"], ["cidx"]),
        helper.make_node("Gather", ["emb", "cidx"], ["cemb4"]),
        helper.make_node("ReduceSum", ["cemb4", "ax2"], ["cand"], keepdims=0),
    ]
    for head in ("ctr", "cvr"):
        val_nodes += [
            helper.make_node("MatMul", ["v_user", f"w_{head}"], [f"u_{head}"]),
            helper.make_node("Unsqueeze", [f"u_{head}", "ax1"], [f"u3_{head}"]),
            helper.make_node("Mul", ["cand", f"u3_{head}"], [f"p_{head}"]),
            helper.make_node("ReduceSum", [f"p_{head}", "ax2"], [f"s_{head}"], keepdims=0),
            helper.make_node("Add", [f"s_{head}", f"b_{head}"], [f"l_{head}"]),
            helper.make_node("Sigmoid", [f"l_{head}"], [f"p{head}"]),
        ]
    value = _model(
        val_nodes, "value",
        [helper.make_tensor_value_info("memory", F, ["B", "S", D]),
         helper.make_tensor_value_info("memory_mask", F, ["B", "S"]),
         helper.make_tensor_value_info("candidates", I64, ["B", "C", T])],
        [helper.make_tensor_value_info("pctr", F, ["B", "C"]),
         helper.make_tensor_value_info("pcvr", F, ["B", "C"])],
        [*common, eps, _init("w_ctr", w(D, D)), _init("w_cvr", w(D, D)),
         _init("b_ctr", np.array(-2.0, np.float32)), _init("b_cvr", np.array(-1.5, np.float32))])
    return {"encoder.onnx": encoder, "decoder_step.onnx": decoder, "value.onnx": value}


def _parity(directory: Path, spec: SnapshotSpec, ids: dict[str, list[int]],
            rng: np.random.Generator) -> dict[str, Any]:
    import onnxruntime as ort

    sess = {n: ort.InferenceSession(str(directory / f"{n}.onnx"),
                                    providers=["CPUExecutionProvider"])
            for n in ("encoder", "decoder_step", "value")}
    T, H = len(spec.level_sizes), spec.history_len
    C = len(spec.context_features) + spec.organic_len
    table = np.array(list(ids.values()), dtype=np.int64).reshape(-1, T)
    B = 2
    history = np.zeros((B, H, T), np.int64)
    hmask = np.zeros((B, H), np.float32)
    for b in range(B):
        n = min(H, len(table), 2 + b)
        if n:
            history[b, :n] = table[rng.integers(0, len(table), n)]
            hmask[b, :n] = 1.0
    context = rng.integers(0, spec.context_buckets, (B, C)).astype(np.int64)
    enc_in = {"history": history, "history_mask": hmask, "context": context}
    memory, mmask, lower, memory_kv = sess["encoder"].run(None, enc_in)
    # three beams: two of request 1, one of request 0 (order as the server's search may have)
    beam_request = np.array([1, 0, 1], np.int64)
    prefix = table[:3, :1] if len(table) >= 3 else np.zeros((3, 1), np.int64)
    dec_in = {"memory_kv": memory_kv, "memory_mask": mmask, "lower": lower,
              "beam_request": beam_request, "prefix": prefix}
    (logits,) = sess["decoder_step"].run(None, dec_in)
    cands = np.stack([table[:3] if len(table) >= 3 else np.zeros((3, T), np.int64)] * B)
    val_in = {"memory": memory, "memory_mask": mmask, "candidates": cands}
    pctr, pcvr = sess["value"].run(None, val_in)
    delta = 0.5 if spec.parity_fail else 0.0
    outs: dict[str, dict[str, Any]] = {
        "encoder": {"memory": memory + delta, "memory_mask": mmask, "lower": lower,
                    "memory_kv": memory_kv},
        "decoder_step": {"logits": logits}, "value": {"pctr": pctr, "pcvr": pcvr}}

    def lists(d: dict[str, Any]) -> dict[str, Any]:
        return {k: np.asarray(v).tolist() for k, v in d.items()}

    if spec.parity_layout == "flat":
        return {"inputs": lists({**enc_in, "beam_request": beam_request, "prefix": prefix,
                                 "candidates": cands}),
                "outputs": lists({**outs["encoder"], **outs["decoder_step"], **outs["value"]}),
                "atol": 1e-4}
    if spec.parity_layout == "short_names":
        return {"inputs": {"encoder": lists(enc_in), "decoder_step": lists(dec_in),
                           "value": lists(val_in)},
                "outputs": {k: lists(v) for k, v in outs.items()}, "atol": 1e-4}
    # learner.export's layout: keyed by file name
    return {"inputs": {"encoder.onnx": lists(enc_in), "decoder_step.onnx": lists(dec_in),
                       "value.onnx": lists(val_in)},
            "outputs": {f"{k}.onnx": lists(v) for k, v in outs.items()}, "atol": 1e-4}


def build_snapshot(directory: Path, spec: SnapshotSpec | None = None,
                   **overrides: Any) -> BuiltSnapshot:
    """Write a snapshot for ``spec`` (fields can be overridden by keyword) into ``directory``."""
    spec = spec or SnapshotSpec()
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise TypeError(f"SnapshotSpec has no field {k!r}")
        setattr(spec, k, v)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    ad_ids = list(spec.ad_ids) if spec.ad_ids is not None else \
        [f"ad-{i:04d}" for i in range(spec.n_ads)]
    organic: dict[str, list[int]] = {}
    if spec.organic_ids:
        sizes = list(spec.level_sizes)
        ids = make_id_table(ad_ids, [sizes[0] - 1, *sizes[1:]], spec.id_seed)
        organic = {i: [sizes[0] - 1, *row[1:]] for i, row in make_id_table(
            list(spec.organic_ids), [1, *sizes[1:]], spec.id_seed + 1).items()}
    else:
        ids = make_id_table(ad_ids, spec.level_sizes, spec.id_seed)
    if spec.extra_ad_ids:
        taken = {tuple(row) for row in ids.values()}
        fresh = (list(row) for row in np.ndindex(*spec.level_sizes) if row not in taken)
        ids.update({a: [int(x) for x in next(fresh)] for a in spec.extra_ad_ids})
        ad_ids += list(spec.extra_ad_ids)
    files: dict[str, dict[str, Any]] = {}
    for name, model in _graphs(spec, rng).items():
        data = model.SerializeToString()
        if spec.corrupt == name:
            data = b"not an onnx model" + data[: len(data) // 3]
        (directory / name).write_bytes(data)
        files[name] = {"sha256": sha256_hex(data), "bytes": len(data)}
    parity = _parity(directory, spec, ids, rng) if spec.corrupt is None else \
        {"inputs": {}, "outputs": {}, "atol": 1e-4}
    manifest = {
        "format": spec.format, "model_name": spec.model_name, "version": spec.version,
        "parent": spec.parent, "id_space_version": f"ids-test-{spec.id_seed}",
        "created_time": time.time(), "mode": "lazy_ar", "level_sizes": list(spec.level_sizes),
        "semantic_levels": max(1, len(spec.level_sizes) - 1), "history_len": spec.history_len,
        "context_features": list(spec.context_features),
        "context_buckets": spec.context_buckets, "organic_len": spec.organic_len,
        "files": files, "ids": ids, **({"organic_ids": organic} if organic else {}),
        "parity": parity, "metrics": dict(spec.metrics),
    }
    data = json.dumps(manifest).encode()
    (directory / "manifest.json").write_bytes(data)
    if spec.bad_checksum:
        with open(directory / spec.bad_checksum, "ab") as fh:
            fh.write(b"\0tampered")
    return BuiltSnapshot(directory, manifest, sha256_hex(data), spec)


# -- running the HTTP server in-process (tests, benchmark) ------------------------------
class ServerThread:
    """``adloop serve`` on a background thread with real HTTP on a free port."""

    def __init__(self, settings: Any, kafka: Any) -> None:
        import uvicorn

        from server.app import create_app

        self.app = create_app(settings, kafka)
        self._config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                      access_log=False, lifespan="on")
        self.server = uvicorn.Server(self._config)
        import threading

        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(30)
