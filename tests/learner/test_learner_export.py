"""ONNX export: parity with torch, the contract's names/shapes, checksums that verify."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from learner.beam import OrtBackend, TorchBackend, beam_search
from learner.data import build_examples
from learner.evaluate import trie_of
from learner.export import SnapshotError, export_run, sha256_file, verify_snapshot
from learner.model import GenerativeRecommender
from learner.pretrain import PretrainResult

CONTRACT = {
    "encoder.onnx": ({"history": "int64", "history_mask": "float", "context": "int64"},
                     ["memory", "memory_mask", "lower", "memory_kv"]),
    "decoder_step.onnx": ({"memory_kv": "float", "memory_mask": "float", "lower": "float",
                           "beam_request": "int64", "prefix": "int64"}, ["logits"]),
    "value.onnx": ({"memory": "float", "memory_mask": "float", "candidates": "int64",
                    "context": "int64", "exposure": "float"}, ["pctr", "pcvr"]),
}
"""The default model's graphs (its value head has wide terms and the exposure term:
value.onnx reads context and exposure)."""


@pytest.fixture(scope="module")
def snapshot(trained_lazy: PretrainResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("snap") / "v000001"
    t0 = time.perf_counter()
    export_run(trained_lazy.run_dir, out, "v000001", parent="v000000")
    assert time.perf_counter() - t0 < 15.0, "export must take seconds"
    return out


def _sess(snapshot: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(snapshot / name), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("B,K,H,C", [(1, 1, 10, 1), (3, 5, 10, 4), (7, 16, 4, 9)])
def test_onnx_matches_torch_for_random_batches_and_beams(
        snapshot: Path, trained_lazy: PretrainResult, B: int, K: int, H: int, C: int) -> None:
    model: GenerativeRecommender = trained_lazy.model.eval()
    _, ids = trained_lazy.tokenizer.id_array()
    rng = np.random.default_rng(B * 100 + K)
    history = ids[rng.integers(len(ids), size=(B, H))]
    mask = (rng.random((B, H)) < 0.7).astype(np.float32)
    mask[:, 0] = 1.0
    history[mask == 0] = 0
    n_ctx, n_org = len(model.cfg.context_features), model.cfg.organic_len
    context = rng.integers(0, 1024, size=(B, n_ctx + n_org)).astype(np.int64)
    context[:, n_ctx + rng.integers(0, n_org + 1):] = 0    # organic histories of any length
    enc, step, val = (_sess(snapshot, n) for n in CONTRACT)
    memory, mmask, lower, kv = enc.run(None, {"history": history, "history_mask": mask,
                                              "context": context})
    with torch.no_grad():
        t_enc = model.encode(torch.from_numpy(history), torch.from_numpy(mask),
                             torch.from_numpy(context))
    # M=1 top block, 4 heads, S = context ids + history + organic topics
    assert kv.shape == (B, 1, 2, 4, n_ctx + H + n_org, 32 // 4)
    worst = max(np.abs(a - t.numpy()).max()
                for a, t in zip((memory, mmask, lower, kv), t_enc, strict=True))
    N = B * K
    # beams in any order, a different number per request (as the server's search has them)
    beam_request = np.sort(rng.integers(B, size=N)) if K > 1 else np.arange(B)
    per_request = {"memory_kv": kv, "memory_mask": mmask, "lower": lower,
                   "beam_request": beam_request}
    for P in range(trained_lazy.tokenizer.config.id_len):
        prefix = ids[rng.integers(len(ids), size=N), :P].astype(np.int64)
        (logits,) = step.run(None, {**per_request, "prefix": prefix})
        with torch.no_grad():
            t_logits = model.decoder.step(*(torch.from_numpy(v) for v in per_request.values()),
                                          torch.from_numpy(prefix))
            # the same beams as per-beam rows of their request's states
            per_beam = model.decoder.step(*(torch.from_numpy(v[beam_request]) for v in
                                            (kv, mmask, lower)), None, torch.from_numpy(prefix))
        assert torch.allclose(t_logits, per_beam, atol=1e-5)
        assert logits.shape == (N, max(trained_lazy.tokenizer.config.token_sizes))
        valid = trained_lazy.tokenizer.config.token_sizes[P]
        assert (logits[:, valid:] <= -1e8).all()
        worst = max(worst, np.abs(logits - t_logits.numpy()).max())
    cands = ids[rng.integers(len(ids), size=(B, C))]
    seen = rng.integers(0, 4, size=(B, C)).astype(np.float32)   # earlier impressions
    pctr, pcvr = val.run(None, {"memory": memory, "memory_mask": mmask, "candidates": cands,
                                "context": context, "exposure": seen})
    with torch.no_grad():
        t_ctr, t_cvr = model.value(t_enc[0], t_enc[1], torch.from_numpy(cands),
                                   context=torch.from_numpy(context),
                                   exposure=torch.from_numpy(seen))
    assert pctr.shape == pcvr.shape == (B, C) and ((pctr > 0) & (pctr < 1)).all()
    worst = max(worst, np.abs(pctr - torch.sigmoid(t_ctr).numpy()).max(),
                np.abs(pcvr - torch.sigmoid(t_cvr).numpy()).max())
    assert worst < 1e-4


def test_graphs_follow_the_snapshot_contract(snapshot: Path) -> None:
    for name, (inputs, outputs) in CONTRACT.items():
        model = onnx.load(str(snapshot / name))
        onnx.checker.check_model(model, full_check=True)
        got = {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()
               for i in model.graph.input}
        assert got == inputs
        assert [o.name for o in model.graph.output] == outputs
        assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
        for i in model.graph.input:  # batch/beam axis is symbolic
            assert i.type.tensor_type.shape.dim[0].dim_param


def test_manifest_lists_versions_ids_and_checksums_that_verify(
        snapshot: Path, trained_lazy: PretrainResult) -> None:
    manifest = verify_snapshot(snapshot, parity=True)
    tok = trained_lazy.tokenizer
    assert manifest["version"] == "v000001" and manifest["parent"] == "v000000"
    assert manifest["id_space_version"] == tok.id_space_version
    assert manifest["level_sizes"] == list(tok.config.token_sizes)
    assert manifest["semantic_levels"] == 2 and manifest["mode"] == "lazy_ar"
    assert manifest["history_len"] == 10 and manifest["context_buckets"] == 1024
    assert manifest["context_features"] == ["device", "placement", "hour", "region", "age",
                                            "interest"]
    assert manifest["organic_len"] == 20           # organic topic ids after the context ids
    assert len(manifest["parity"]["inputs"]["encoder.onnx"]["context"][0]) == 6 + 20
    assert manifest["ids"] == tok.table()
    assert manifest["parity"]["atol"] == 1e-4
    assert set(manifest["parity"]["inputs"]) == set(CONTRACT)
    assert manifest["metrics"]["parity_max_abs_diff"] < 1e-4
    assert "recall@10" in manifest["metrics"]
    for name in CONTRACT:
        assert manifest["files"][name]["sha256"] == sha256_file(snapshot / name)
    assert not list(snapshot.glob("*.pt"))  # nothing pickled in a snapshot


def test_tampered_file_fails_verification_naming_it(snapshot: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(snapshot, bad)
    data = bytearray((bad / "value.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bad / "value.onnx").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=r"value.onnx: sha256 .* does not match"):
        verify_snapshot(bad)
    manifest = json.loads((snapshot / "manifest.json").read_text())
    del manifest["files"]["encoder.onnx"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"no entry for encoder.onnx"):
        verify_snapshot(bad)


def test_snapshots_are_immutable(snapshot: Path, trained_lazy: PretrainResult) -> None:
    with pytest.raises(SnapshotError, match="not empty"):
        export_run(trained_lazy.run_dir, snapshot, "v000001")


def test_beam_search_on_onnx_runtime_returns_the_torch_beams(
        snapshot: Path, trained_lazy: PretrainResult, synth_log) -> None:
    tok = trained_lazy.tokenizer
    trie, _ = trie_of(tok)
    ex = build_examples(synth_log.feedback[-50:], tok, history_len=10)
    b = ex.batch(list(range(6)))
    r_t = beam_search(TorchBackend(trained_lazy.model), b.history, b.history_mask, b.context,
                      trie, [4, 8, 8, 8, 8, 12])
    r_o = beam_search(OrtBackend(snapshot), b.history, b.history_mask, b.context, trie,
                      [4, 8, 8, 8, 8, 12])
    assert torch.equal(r_t.rows, r_o.rows)
    assert torch.allclose(r_t.scores, r_o.scores, atol=1e-4)
    found = r_t.rows >= 0
    assert found[:, 0].all()
    # narrow early beams may leave fewer than 12 leaves: those slots are empty, not made up
    assert torch.isinf(r_t.scores[~found]).all() and (r_t.ids[~found] == -1).all()
    for row in r_t.ids[found].tolist():  # every returned id is a live ad
        tok.ad_of(row)
