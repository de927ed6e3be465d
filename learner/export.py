"""``adloop export``: a checkpoint -> an ONNX snapshot (docs/snapshot-format.md).

A snapshot directory holds ``encoder.onnx``, ``decoder_step.onnx``, ``value.onnx`` and
``manifest.json``. Export steps:
1. trace the three graphs with ``torch.onnx.export`` (TorchScript exporter, opset 17,
   batch / beam / prefix / history / candidate axes dynamic) into a temporary sibling
   directory, and ``onnx.checker`` each file;
2. build reference inputs, run torch on them (the manifest's ``parity``) and check
   ONNX Runtime (CPU) reproduces them within ``atol``;
3. write ``manifest.json`` with every file's sha256 and size, the tokenizer's id table
   and the id space version;
4. rename the temporary directory to the snapshot directory (snapshots are
   immutable: an existing non-empty directory is refused unless ``overwrite``).

A model with GPR's intent decoder (``intent_tokens``) runs it inside ``encoder.onnx``:
its rows are memory rows like any other (S grows by I, or the user rows make way for
them in ``replace`` mode), so the graphs' inputs and outputs are unchanged and
``decoder_step.onnx`` never runs it; the manifest's ``intent_decoder`` says so.

A model with prior heads adds ``prior_log_mix`` [B, L] to the encoder's outputs and to
the decoder step's inputs (:func:`specs`); models without them export the graphs
exactly as before.

``parity`` layout: ``{"inputs": {file: {tensor: nested list}}, "outputs": {file:
{tensor: nested list}}, "atol": 1e-4}``; dtypes are those of the contract.
:func:`verify_snapshot` re-checks sizes, checksums, the ONNX checker, the id table
and (optionally) parity; every failure names the file and what is wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from pydantic_settings import BaseSettings, SettingsConfigDict
from torch import Tensor, nn

from learner.model import GenerativeRecommender
from learner.tokenizer import IdSpaceMismatchError, UASIDTokenizer
from snapshot_format import FORMAT, PRIOR_LOG_MIX, REQUIRED_FILES, declared_feeds, session_options
from streams.logs import get_logger
from streams.settings import add_settings_arguments, settings_from_args

log = get_logger(__name__)

OPSET = 17
ATOL = 1e-4
HISTORY_ORDER = ("rows follow recent_ad_ids in the order given; the first history_len of "
                 "them; padding rows (all 0, mask 0) after the real ones")


class SnapshotError(ValueError):
    """A snapshot that fails verification; the message names the file and the check."""


# --------------------------------------------------------------------------------------
# the three exported graphs


class EncoderGraph(nn.Module):
    """With prior heads, a fifth output: the per-request log mixture over the leaf heads."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: Tensor, history_mask: Tensor,
                context: Tensor) -> tuple[Tensor, ...]:
        memory, mask, lower, kv = self.model.encode(history, history_mask, context)
        mix = self.model.prior_log_mix(memory, mask)
        return (memory, mask, lower, kv) if mix is None else (memory, mask, lower, kv, mix)


class DecoderStepGraph(nn.Module):
    """With prior heads, a sixth input: ``prior_log_mix`` [B, L], per request."""

    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory_kv: Tensor, memory_mask: Tensor, lower: Tensor,
                beam_request: Tensor, prefix: Tensor,
                prior_log_mix: Tensor | None = None) -> Tensor:
        return self.model.decoder.step(memory_kv, memory_mask, lower, beam_request, prefix,
                                       prior_log_mix)


class ValueGraph(nn.Module):
    def __init__(self, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, memory: Tensor, memory_mask: Tensor, memory_kv: Tensor,
                candidates: Tensor, context: Tensor | None = None,
                exposure: Tensor | None = None) -> tuple[Tensor, Tensor]:
        pctr, pcvr = self.model.value(memory, memory_mask, candidates, memory_kv, context,
                                      exposure)
        return torch.sigmoid(pctr), torch.sigmoid(pcvr)


SPECS: dict[str, tuple[list[str], list[str], dict[str, dict[int, str]]]] = {
    "encoder.onnx": (
        ["history", "history_mask", "context"], ["memory", "memory_mask", "lower", "memory_kv"],
        {"history": {0: "B", 1: "H"}, "history_mask": {0: "B", 1: "H"}, "context": {0: "B"},
         "memory": {0: "B", 1: "S"}, "memory_mask": {0: "B", 1: "S"}, "lower": {0: "B"},
         "memory_kv": {0: "B", 4: "S"}}),
    "decoder_step.onnx": (
        ["memory_kv", "memory_mask", "lower", "beam_request", "prefix"], ["logits"],
        {"memory_kv": {0: "B", 4: "S"}, "memory_mask": {0: "B", 1: "S"}, "lower": {0: "B"},
         "beam_request": {0: "N"}, "prefix": {0: "N", 1: "P"}, "logits": {0: "N"}}),
    "value.onnx": (
        ["memory", "memory_mask", "memory_kv", "candidates", "context", "exposure"],
        ["pctr", "pcvr"],
        {"memory": {0: "B", 1: "S"}, "memory_mask": {0: "B", 1: "S"},
         "memory_kv": {0: "B", 4: "S"}, "context": {0: "B"}, "exposure": {0: "B", 1: "C"},
         "candidates": {0: "B", 1: "C"}, "pctr": {0: "B", 1: "C"}, "pcvr": {0: "B", 1: "C"}}),
}
"""Graph inputs, outputs and dynamic axes of a model without prior heads."""


def specs(model: GenerativeRecommender
          ) -> dict[str, tuple[list[str], list[str], dict[str, dict[int, str]]]]:
    """:data:`SPECS` of ``model``: with prior heads the encoder also outputs and the
    decoder step also takes ``prior_log_mix`` [B, L] (snapshot_format.PRIOR_LOG_MIX)."""
    if model.decoder.n_leaves == 0:
        return SPECS
    out = {k: (list(i), list(o), dict(a)) for k, (i, o, a) in SPECS.items()}
    out["encoder.onnx"][1].append(PRIOR_LOG_MIX)
    out["encoder.onnx"][2][PRIOR_LOG_MIX] = {0: "B"}
    out["decoder_step.onnx"][0].append(PRIOR_LOG_MIX)
    out["decoder_step.onnx"][2][PRIOR_LOG_MIX] = {0: "B"}
    return out


def reference_inputs(model: GenerativeRecommender, ids: np.ndarray, seed: int = 0,
                     B: int = 2, K: int = 3, P: int = 2, C: int = 3
                     ) -> dict[str, dict[str, np.ndarray]]:
    """Small, valid inputs for every graph (history/candidates/prefix from real ids)."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    H, T = cfg.history_len, cfg.id_len
    history = ids[rng.integers(len(ids), size=(B, H))].astype(np.int64)       # [B, H, T]
    mask = np.ones((B, H), dtype=np.float32)
    mask[-1, H // 2:] = 0.0
    history[mask == 0] = 0
    context = rng.integers(0, cfg.context_buckets,
                           size=(B, len(cfg.context_features) + cfg.organic_len))
    if cfg.organic_len:                 # a short organic history: padding ids (0) too
        context[-1, len(cfg.context_features) + cfg.organic_len // 2:] = 0
    enc_in: dict[str, np.ndarray] = {"history": history, "history_mask": mask,
                                     "context": context.astype(np.int64)}
    with torch.no_grad():
        enc = model.encode(*(torch.from_numpy(v) for v in enc_in.values()))
        mix = model.prior_log_mix(enc[0], enc[1])
        memory, mmask, lower, memory_kv = (x.numpy() for x in enc)
    P = min(P, T - 1)
    # beams not grouped by request and not the same count per request, as in the server
    beam_request = rng.permutation(np.r_[np.arange(B), rng.integers(B, size=B * K - B)])
    step_in: dict[str, np.ndarray] = {
        "memory_kv": memory_kv, "memory_mask": mmask, "lower": lower,
        "beam_request": beam_request.astype(np.int64),
        "prefix": ids[rng.integers(len(ids), size=B * K), :P].astype(np.int64)}
    if mix is not None:
        step_in[PRIOR_LOG_MIX] = mix.numpy()
    value_in: dict[str, np.ndarray] = {
        "memory": memory, "memory_mask": mmask, "memory_kv": memory_kv,
        "candidates": ids[rng.integers(len(ids), size=(B, C))].astype(np.int64),
        "context": enc_in["context"],
        "exposure": rng.integers(0, 6, size=(B, C)).astype(np.float32)}
    return {"encoder.onnx": enc_in, "decoder_step.onnx": step_in, "value.onnx": value_in}


def graphs(model: GenerativeRecommender) -> dict[str, nn.Module]:
    return {"encoder.onnx": EncoderGraph(model), "decoder_step.onnx": DecoderStepGraph(model),
            "value.onnx": ValueGraph(model)}


def torch_outputs(model: GenerativeRecommender, inputs: dict[str, dict[str, np.ndarray]]
                  ) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    spec = specs(model)
    with torch.no_grad():
        for name, g in graphs(model).items():
            res = g(*(torch.from_numpy(v) for v in inputs[name].values()))
            res = res if isinstance(res, tuple) else (res,)
            out[name] = {k: r.numpy() for k, r in zip(spec[name][1], res, strict=True)}
    return out


def ort_outputs(snapshot_dir: Path, inputs: dict[str, dict[str, np.ndarray]]
                ) -> dict[str, dict[str, np.ndarray]]:
    import onnxruntime as ort

    out: dict[str, dict[str, np.ndarray]] = {}
    for name in REQUIRED_FILES:
        sess = ort.InferenceSession(str(snapshot_dir / name), session_options(),
                                    providers=["CPUExecutionProvider"])
        res = sess.run(None, declared_feeds(sess, inputs[name]))
        names = [o.name for o in sess.get_outputs()]
        out[name] = {k: np.asarray(r) for k, r in zip(names, res, strict=True)}
    return out


def max_abs_diff(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]
                 ) -> dict[str, float]:
    """Per ``file:tensor`` max |a - b|."""
    return {f"{f}:{k}": float(np.abs(a[f][k].astype(np.float64) - b[f][k]).max(initial=0.0))
            for f in a for k in a[f]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# export


def export_snapshot(model: GenerativeRecommender, tok: UASIDTokenizer, out_dir: str | Path,
                    version: str, parent: str | None = None, model_name: str = "adloop",
                    metrics: dict[str, float] | None = None, id_space_version: str | None = None,
                    overwrite: bool = False, extra: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Write a snapshot of ``model`` (in ``tok``'s id space) and return its manifest."""
    if id_space_version is not None:
        tok.check_version(id_space_version, what="model")
    if tuple(model.cfg.level_sizes) != tok.config.token_sizes:
        raise IdSpaceMismatchError(f"model level sizes {list(model.cfg.level_sizes)} differ "
                                   f"from the tokenizer's {list(tok.config.token_sizes)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SnapshotError(f"snapshot directory {out} is not empty (snapshots are immutable)")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = model.eval()
    _, ids = tok.id_array()
    inputs = reference_inputs(model, ids)
    expected = torch_outputs(model, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        spec = specs(model)
        for name, g in graphs(model).items():
            in_names, out_names, axes = spec[name]
            args = tuple(torch.from_numpy(v) for v in inputs[name].values())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(g, args, str(tmp / name), input_names=in_names,
                                  output_names=out_names, dynamic_axes=axes,
                                  opset_version=OPSET, dynamo=False, do_constant_folding=True)
            onnx.checker.check_model(str(tmp / name), full_check=True)
        diffs = max_abs_diff(expected, ort_outputs(tmp, inputs))
        worst = max(diffs.values())
        if worst > ATOL:
            bad = {k: v for k, v in diffs.items() if v > ATOL}
            raise SnapshotError(f"ONNX Runtime differs from torch beyond {ATOL}: {bad}")
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "model_name": model_name,
            "version": version,
            "parent": parent,
            "id_space_version": tok.id_space_version,
            "created_time": time.time(),
            "mode": model.cfg.mode,
            "level_sizes": list(model.cfg.level_sizes),
            "semantic_levels": model.cfg.semantic_levels,
            "history_len": model.cfg.history_len,
            "history_order": HISTORY_ORDER,
            "context_features": list(model.cfg.context_features),
            "context_buckets": model.cfg.context_buckets,
            "organic_len": model.cfg.organic_len,
            "d_model": model.cfg.d_model,
            "ranker": {"task_tokens": model.cfg.task_tokens, "fake_items": model.cfg.fake_items,
                       "kv_pass_through": model.cfg.ranker_kv},
            "prior_heads": _prior_heads(model),
            "intent_decoder": ({"tokens": model.cfg.intent_tokens,
                                "layers": model.cfg.n_intent_layer,
                                "mode": model.cfg.intent_mode}
                               if model.cfg.intent_tokens else None),
            "opset": OPSET,
            "files": {name: {"sha256": sha256_file(tmp / name),
                             "bytes": (tmp / name).stat().st_size} for name in REQUIRED_FILES},
            "ids": tok.table(),
            "organic_ids": tok.organic_table(),
            "parity": {"inputs": _jsonable(inputs), "outputs": _jsonable(expected),
                       "atol": ATOL},
            "metrics": {**(metrics or {}), "parity_max_abs_diff": worst},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported snapshot", dir=str(out), version=version, seconds=round(
        time.perf_counter() - t0, 3), parity_max_abs_diff=worst)
    return manifest


def export_ids_update(src_dir: str | Path, tok: UASIDTokenizer, out_dir: str | Path,
                      version: str, metrics: dict[str, float] | None = None
                      ) -> dict[str, Any]:
    """A new version of the snapshot in ``src_dir`` with the same graphs and ``tok``'s
    current id table: ads placed online since (new ads) become servable without an
    export. The graphs take ids, not ad ids, so their checksums and parity evidence
    carry over unchanged; ``parent`` names the source version."""
    src, out = Path(src_dir), Path(out_dir)
    manifest: dict[str, Any] = json.loads((src / "manifest.json").read_text())
    tok.check_version(manifest["id_space_version"], what="snapshot")
    if out.exists() and any(out.iterdir()):
        raise SnapshotError(f"snapshot directory {out} is not empty (snapshots are immutable)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in REQUIRED_FILES:
            try:
                os.link(src / name, tmp / name)
            except OSError:
                shutil.copyfile(src / name, tmp / name)
        manifest.update(version=version, parent=manifest["version"], created_time=time.time(),
                        ids=tok.table(), organic_ids=tok.organic_table())
        manifest["metrics"] = {**manifest.get("metrics", {}), **(metrics or {})}
        (tmp / "manifest.json").write_text(json.dumps(manifest, separators=(",", ":")))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _prior_heads(model: GenerativeRecommender) -> dict[str, Any] | None:
    """The manifest's description of the prior heads (None: no prior heads, the graphs
    have no ``prior_log_mix``)."""
    cfg = model.cfg
    if model.decoder.n_leaves == 0:
        return None
    return {"types": cfg.prior_heads, "horizons": cfg.prior_horizons,
            "leaves": model.decoder.n_leaves, "mix_mode": cfg.prior_mix_mode,
            "short_horizon": cfg.short_horizon}


def _jsonable(d: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {f: {k: v.tolist() for k, v in t.items()} for f, t in d.items()}


def export_run(run_dir: str | Path, out_dir: str | Path, version: str,
               parent: str | None = None, model_name: str = "adloop",
               overwrite: bool = False) -> dict[str, Any]:
    """Export a pretraining/learner run directory's checkpoint."""
    from learner.checkpoint import load_model

    model, tok, ckpt = load_model(run_dir)
    extra = {"data_watermark": ckpt.get("extra", {}).get("data_watermark", 0.0),
             "train_step": ckpt["step"]}
    return export_snapshot(model, tok, out_dir, version, parent, model_name,
                           ckpt.get("metrics"), ckpt["id_space_version"], overwrite, extra)


# --------------------------------------------------------------------------------------
# verification


def verify_snapshot(snapshot_dir: str | Path, parity: bool = False,
                    id_space_version: str | None = None) -> dict[str, Any]:
    """Check a snapshot and return its manifest; raise :class:`SnapshotError` (or
    :class:`IdSpaceMismatchError`) naming the file and the failed check."""
    d = Path(snapshot_dir)
    mpath = d / "manifest.json"
    if not mpath.exists():
        raise SnapshotError(f"{d}: manifest.json is missing")
    try:
        manifest: dict[str, Any] = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise SnapshotError(f"{mpath}: not JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{mpath}: format {manifest.get('format')} not supported "
                            f"(reads {FORMAT}; re-export the checkpoint with adloop export)")
    if id_space_version is not None and manifest.get("id_space_version") != id_space_version:
        raise IdSpaceMismatchError(
            f"snapshot {d.name} is in id space {manifest.get('id_space_version')!r}, "
            f"expected {id_space_version!r}")
    files = manifest.get("files", {})
    for name in REQUIRED_FILES:
        entry, path = files.get(name), d / name
        if entry is None:
            raise SnapshotError(f"{mpath}: no entry for {name}")
        if not path.exists():
            raise SnapshotError(f"{path}: missing")
        if path.stat().st_size != entry["bytes"]:
            raise SnapshotError(f"{path}: {path.stat().st_size} bytes, manifest says "
                                f"{entry['bytes']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise SnapshotError(f"{path}: sha256 {digest} does not match the manifest's "
                                f"{entry['sha256']}")
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise SnapshotError(f"{path}: onnx.checker failed: {exc}") from exc
    sizes = manifest["level_sizes"]
    seen: dict[tuple[int, ...], str] = {}
    for ad_id, sid in manifest.get("ids", {}).items():
        if len(sid) != len(sizes) or any(not 0 <= t < s for t, s in zip(sid, sizes, strict=False)):
            raise SnapshotError(f"{mpath}: id {sid} of ad {ad_id!r} does not fit level_sizes "
                                f"{sizes}")
        if tuple(sid) in seen:
            raise SnapshotError(f"{mpath}: ads {seen[tuple(sid)]!r} and {ad_id!r} share id {sid}")
        seen[tuple(sid)] = ad_id
    if parity:
        p = manifest["parity"]
        dtypes = {"history": np.int64, "context": np.int64, "prefix": np.int64,
                  "candidates": np.int64, "beam_request": np.int64}
        inputs = {f: {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in t.items()}
                  for f, t in p["inputs"].items()}
        expected = {f: {k: np.asarray(v, dtype=np.float32) for k, v in t.items()}
                    for f, t in p["outputs"].items()}
        diffs = max_abs_diff(expected, ort_outputs(d, inputs))
        bad = {k: v for k, v in diffs.items() if v > p["atol"]}
        if bad:
            raise SnapshotError(f"{d}: outputs differ from the manifest's parity reference "
                                f"beyond {p['atol']}: {bad}")
    return manifest


# --------------------------------------------------------------------------------------
# CLI


class ExportSettings(BaseSettings):
    """``adloop export`` settings (env ADLOOP_EXPORT_<NAME>)."""

    model_config = SettingsConfigDict(env_prefix="ADLOOP_EXPORT_", extra="ignore")

    run_dir: Path = Path("runs/pretrain")
    """Run directory with checkpoint.pt and tokenizer/."""
    out: Path | None = None
    """Snapshot directory (default: <run_dir>/snapshots/<version>)."""
    version: str = ""
    """Snapshot version (default: v<unix time>)."""
    parent: str | None = None
    model_name: str = "adloop"
    overwrite: bool = False
    verify: bool = True
    """Re-verify the written snapshot (checksums, checker, parity)."""


def configure(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, ExportSettings)


def run(args: argparse.Namespace) -> int:
    s = settings_from_args(ExportSettings, args)
    version = s.version or f"v{int(time.time())}"
    out = s.out or Path(s.run_dir) / "snapshots" / version
    manifest = export_run(s.run_dir, out, version, s.parent, s.model_name, s.overwrite)
    if s.verify:
        verify_snapshot(out, parity=True)
    print(json.dumps({"snapshot": str(out), "version": version,
                      "id_space_version": manifest["id_space_version"],
                      "manifest_sha256": sha256_file(Path(out) / "manifest.json")}))
    return 0
