"""onnxruntime sessions of one snapshot, on the CUDA execution provider when a GPU is
usable (IO binding) and on the CPU provider otherwise.

:func:`resolve_provider` decides once per process: ``cuda`` is used only if
onnxruntime lists ``CUDAExecutionProvider`` *and* a probe session really runs on it
(onnxruntime-gpu lists CUDA even on machines without a GPU and then falls back).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from snapshot_format import (
    FORMAT,
    MODEL_IO,
    PRIOR_LOG_MIX,
    declared_feeds,
    model_io,
    session_options,
)
from streams.logs import get_logger

log = get_logger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

class UserStates(NamedTuple):
    """``encoder.onnx`` outputs for B requests, computed once per request."""

    memory: np.ndarray        # [B, S, D]
    memory_mask: np.ndarray   # [B, S]
    lower: np.ndarray         # [B, T, D]
    memory_kv: np.ndarray     # [B, M, 2, heads, S, D/heads]
    prior_log_mix: np.ndarray | None = None
    """[B, L]: the log mixture over the model's leaf prior heads (snapshots with prior
    heads only; ``decoder_step.onnx`` takes it)."""
    context: np.ndarray | None = None
    """[B, C + O]: the encoder's ``context`` input, kept for a ``value.onnx`` with wide
    crossed terms (it reads the raw ids)."""

    def arrays(self) -> list[np.ndarray]:
        """The encoder's outputs present (for finiteness checks)."""
        return [a for a in self[:5] if a is not None]


@dataclass(frozen=True)
class Provider:
    name: str          # "cuda" or "cpu"
    ort_name: str
    device: str        # what it runs on, in words
    reason: str        # why this one


_resolved: dict[tuple[str, int], Provider] = {}
_resolve_lock = threading.Lock()


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def resolve_provider(choice: str = "auto", device_id: int = 0) -> Provider:
    """``auto`` | ``cuda`` | ``cpu`` -> the provider that will actually run."""
    choice = choice.lower()
    if choice not in ("auto", "cuda", "cpu"):
        raise ValueError(f"provider must be auto, cuda or cpu, not {choice!r}")
    key = (choice, device_id)
    with _resolve_lock:
        if key in _resolved:
            return _resolved[key]
        provider = _resolve(choice, device_id)
        _resolved[key] = provider
        log.info("provider.selected", provider=provider.name, device=provider.device,
                 reason=provider.reason)
        return provider


def _resolve(choice: str, device_id: int) -> Provider:
    cpu = Provider("cpu", CPU, _cpu_name(), "")
    if choice == "cpu":
        return Provider(cpu.name, cpu.ort_name, cpu.device, "configured")
    ort.set_default_logger_severity(3)   # the probe's fallback is logged below, once
    if CUDA not in ort.get_available_providers():
        return Provider("cpu", CPU, cpu.device, "onnxruntime has no CUDA provider")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(_probe_model(), opts,
                                    providers=[(CUDA, {"device_id": device_id}), CPU])
        active = sess.get_providers()
        if active[0] != CUDA:
            raise RuntimeError(f"session fell back to {active}")
        sess.run(None, {"x": np.ones(1, np.float32)})
    except Exception as exc:  # no GPU, no driver, missing CUDA libraries
        reason = f"CUDA provider unusable ({str(exc).splitlines()[0][:200]}); using CPU"
        if choice == "cuda":
            log.warning("provider.cuda_unusable", reason=reason)
        return Provider("cpu", CPU, cpu.device, reason)
    return Provider("cuda", CUDA, _gpu_name(device_id), "CUDA device usable")


def _cpu_name() -> str:
    import os

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _gpu_name(device_id: int) -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
                              f"--id={device_id}"], capture_output=True, text=True, timeout=10)
        name = out.stdout.strip()
        if name:
            return f"gpu: {name}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"gpu: cuda:{device_id}"


class ModelRuntime:
    """The three sessions of one snapshot. Thread-safe (onnxruntime's ``run`` is).

    ``prior``: the snapshot's model has prior heads (its encoder outputs and its
    decoder step takes ``prior_log_mix``); snapshots without them load as before."""

    def __init__(self, directory: Path, provider: Provider, intra_op_threads: int = 0,
                 device_id: int = 0) -> None:
        self.provider = provider
        self.device_id = device_id
        opts = session_options(intra_op_threads)
        providers: list[Any] = ([(CUDA, {"device_id": device_id}), CPU]
                                if provider.name == "cuda" else [CPU])
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name in MODEL_IO:
            self.sessions[name] = ort.InferenceSession(str(directory / f"{name}.onnx"), opts,
                                                       providers=providers)
        have_in = {n: {i.name for i in s.get_inputs()} for n, s in self.sessions.items()}
        have_out = {n: {o.name for o in s.get_outputs()} for n, s in self.sessions.items()}
        self.prior = PRIOR_LOG_MIX in have_in["decoder_step"]
        if self.prior != (PRIOR_LOG_MIX in have_out["encoder"]):
            raise ValueError(f"{PRIOR_LOG_MIX} must be both an output of encoder.onnx and "
                             "an input of decoder_step.onnx, or neither (prior heads)")
        self.io = {name: model_io(name, self.prior) for name in MODEL_IO}
        """Input and output names of each graph of this snapshot."""
        for name, (inputs, outputs) in self.io.items():
            missing = [n for n in outputs if n not in have_out[name]]
            if missing:
                raise ValueError(f"{name}.onnx lacks outputs {missing}")
            unknown = sorted(have_in[name] - set(inputs))
            if unknown:
                raise ValueError(f"{name}.onnx takes inputs {unknown} that snapshot format "
                                 f"{FORMAT} does not define (it defines {list(inputs)})")
        self.input_types = {name: {i.name: i.type for i in s.get_inputs()}
                            for name, s in self.sessions.items()}

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.io[name][1]
        sess = self.sessions[name]
        feeds = declared_feeds(sess, feeds)
        if self.provider.name != "cuda":
            return [np.asarray(o) for o in sess.run(list(outputs), feeds)]
        binding = sess.io_binding()                     # outputs stay on the device
        for key, value in feeds.items():
            binding.bind_ortvalue_input(
                key, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda",
                                                      self.device_id))
        for out in outputs:
            binding.bind_output(out, "cuda", self.device_id)
        sess.run_with_iobinding(binding)
        return [np.asarray(o) for o in binding.copy_outputs_to_cpu()]

    def encode(self, history: np.ndarray, history_mask: np.ndarray,
               context: np.ndarray) -> UserStates:
        out = self.run("encoder", {"history": history, "history_mask": history_mask,
                                   "context": context})
        return UserStates(out[0], out[1], out[2], out[3], out[4] if len(out) > 4 else None,
                          context)

    def step(self, states: UserStates, beam_request: np.ndarray,
             prefix: np.ndarray) -> np.ndarray:
        """Logits [N, V_max] for the next level of N beams: ``beam_request`` [N] is each
        beam's request (row of ``states``), ``prefix`` [N, P] its codes so far. With
        prior heads, each request's ``prior_log_mix`` goes in too (the graph looks it
        up by ``beam_request``)."""
        feeds = {"memory_kv": states.memory_kv, "memory_mask": states.memory_mask,
                 "lower": states.lower, "beam_request": np.asarray(beam_request, np.int64),
                 "prefix": prefix}
        if self.prior:
            if states.prior_log_mix is None:
                raise ValueError(f"this snapshot's decoder step needs {PRIOR_LOG_MIX}")
            feeds[PRIOR_LOG_MIX] = states.prior_log_mix
        return self.run("decoder_step", feeds)[0]

    def value(self, states: UserStates, candidates: np.ndarray,
              rows: np.ndarray | None = None, exposure: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """pCTR, pCVR [B', C] of ``candidates`` [B', C, T] for the requests ``rows`` of
        ``states`` (all of them when None): the ranking decoder reads the encoder's
        memory and, with KV pass-through, its cached keys/values (with wide crossed terms,
        the request's raw ids too; with the exposure term, ``exposure`` [B', C], the
        user's earlier impressions of each candidate, zeros when None)."""
        feeds = {"memory": states.memory, "memory_mask": states.memory_mask,
                 "memory_kv": states.memory_kv}
        if states.context is not None:
            feeds["context"] = states.context
        if rows is not None:
            feeds = {k: v[rows] for k, v in feeds.items()}
        feeds["candidates"] = candidates
        feeds["exposure"] = (exposure.astype(np.float32, copy=False) if exposure is not None
                             else np.zeros(candidates.shape[:2], np.float32))
        pctr, pcvr = self.run("value", feeds)
        return pctr, pcvr

    def close(self) -> None:
        """Drop the sessions (their memory is freed once no batch holds them)."""
        self.sessions = {}


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(double)": np.float64,
               "tensor(float16)": np.float16}


def _as_array(value: Any, ort_type: str | None) -> np.ndarray:
    """A parity tensor: a nested list, or ``{"data": ..., "shape": ..., "dtype": ...}``."""
    dtype: Any = _ORT_DTYPES.get(ort_type or "")
    if isinstance(value, dict) and "data" in value:
        arr = np.asarray(value["data"], dtype=value.get("dtype") or dtype)
        if "shape" in value:
            arr = arr.reshape([int(s) for s in value["shape"]])
    else:
        arr = np.asarray(value, dtype=dtype)
    return arr.astype(dtype) if dtype is not None else arr


def check_parity(runtime: ModelRuntime, parity: dict[str, Any]) -> dict[str, float]:
    """Run the manifest's parity inputs and compare with its reference outputs.

    Two layouts are read: per model (``inputs = {"encoder.onnx": {...},
    "decoder_step.onnx": {...}, "value.onnx": {...}}``, as ``learner.export`` writes,
    with or without the ``.onnx``; ``outputs`` alike) or flat (``inputs`` holds tensors by name;
    the models run in order encoder, decoder_step, value wherever all their inputs are
    known, outputs feeding later models). Returns the max abs error per output;
    raises ``ValueError`` beyond ``atol`` (+ ``rtol``·|ref|) or if nothing compared.
    """
    def model_key(k: str) -> str:
        return k[: -len(".onnx")] if k.endswith(".onnx") else k

    inputs = {model_key(k): v for k, v in (parity.get("inputs") or {}).items()}
    outputs = {model_key(k): v for k, v in (parity.get("outputs") or {}).items()}
    atol, rtol = float(parity.get("atol", 1e-4)), float(parity.get("rtol", 0.0))
    errors: dict[str, float] = {}

    def compare(label: str, got: np.ndarray, ref_raw: Any) -> None:
        ref = _as_array(ref_raw, None).astype(np.float64)
        got64 = np.asarray(got, dtype=np.float64)
        if got64.shape != ref.shape:
            raise ValueError(f"parity {label}: shape {got64.shape} != reference {ref.shape}")
        if not np.isfinite(got64).all():
            raise ValueError(f"parity {label}: output is not finite")
        err = np.abs(got64 - ref)
        errors[label] = float(err.max()) if err.size else 0.0
        if (err > atol + rtol * np.abs(ref)).any():
            raise ValueError(f"parity {label}: max abs error {errors[label]:.3g} > atol {atol}")

    per_model = any(k in MODEL_IO for k in inputs)
    if per_model:
        for name, feeds_raw in inputs.items():
            if name not in MODEL_IO:
                continue
            types = runtime.input_types[name]
            feeds = {k: _as_array(v, types.get(k)) for k, v in feeds_raw.items()}
            got = dict(zip(runtime.io[name][1], runtime.run(name, feeds), strict=True))
            for out, ref in (outputs.get(name) or {}).items():
                if out in got:
                    compare(f"{name}.{out}", got[out], ref)
    else:
        pool: dict[str, Any] = dict(inputs)
        for name, (ins, outs) in runtime.io.items():
            ins = tuple(i for i in ins if i in runtime.input_types[name])
            if not all(i in pool for i in ins):
                continue
            types = runtime.input_types[name]
            feeds = {i: _as_array(pool[i], types.get(i)) for i in ins}
            got = dict(zip(outs, runtime.run(name, feeds), strict=True))
            for out, value in got.items():
                if out in outputs:
                    compare(out, value, outputs[out])
                pool.setdefault(out, value)
    if not errors:
        raise ValueError("parity references compare no output")
    return errors
