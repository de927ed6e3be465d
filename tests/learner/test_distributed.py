"""Data-parallel learner steps (learner/distributed.py) on a real gloo group of 2 ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from adloop.stack import free_port
from learner import synthetic
from learner.distributed import make_data_parallel, step_without_lists
from learner.model import GenerativeRecommender, ModelConfig
from learner.online import LearnerSettings
from learner.rspo_step import OnlineLearner, lists_to_batch
from learner.tokenizer import UASIDTokenizer
from tests.learner.conftest import SMALL_TOKENIZER

STEPS = 5
EMPTY_STEP = 2
"""Rank 1 has no lists at this step (it contributes with weight 0)."""


def _rank_steps(rank: int, world: int, port: int, work: str) -> None:
    from learner.distributed import Group

    torch.set_num_threads(1)
    d = Path(work)
    tok = UASIDTokenizer.load(d / "tok")
    model = GenerativeRecommender(ModelConfig.from_json(json.loads((d / "cfg.json").read_text())))
    model.load_state_dict(torch.load(d / "init.pt", weights_only=True))
    group = Group(rank, world, "127.0.0.1", port, "gloo", timeout_s=60)
    learner = make_data_parallel(OnlineLearner(model, lr=5e-3), group)
    log = synthetic.generate(n_ads=120, n_users=60, n_requests=400, n_categories=6, seed=1)
    mine = [(fb, 1.0) for fb in log.feedback[rank::world]]
    size = 12 if rank == 0 else 5            # unequal batches: weighted by list count
    stats: dict[str, float] = {}
    for step in range(STEPS):
        if rank == 1 and step == EMPTY_STEP:
            step_without_lists(learner)
            continue
        learner.opt.lists = float(size)  # type: ignore[attr-defined]
        stats = learner.update(lists_to_batch(mine[step * size:(step + 1) * size], tok, model))
    refits = float(stats.get("linear_refits", 0.0))
    torch.save({"model": model.state_dict(), "reference": learner.ref.state_dict(),
                "steps": learner.steps, "refits": refits}, d / f"rank{rank}.pt")
    group.close()


@pytest.mark.parametrize("wide", [False, True], ids=["optimizer-only", "linear-refits"])
def test_two_ranks_end_with_identical_parameters_after_unequal_and_empty_batches(
        tmp_path: Path, synth_log: synthetic.SyntheticLog, wide: bool) -> None:
    tok = UASIDTokenizer.fit(synth_log.ads, SMALL_TOKENIZER)
    tok.save(tmp_path / "tok")
    cfg = ModelConfig(level_sizes=tok.config.token_sizes,
                      semantic_levels=tok.config.semantic_levels, d_model=32, n_head=4,
                      n_enc_layer=1, n_layer=2, history_len=10, value_wide=wide)
    torch.manual_seed(0)
    init = GenerativeRecommender(cfg)
    if wide:   # as fit_linear leaves it: (scale, deep offsets, logs' end, half-life)
        init.value.linear_fit.copy_(torch.tensor([1.0, 1.0, 0.0, 3600.0]))
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_json()))
    torch.save(init.state_dict(), tmp_path / "init.pt")

    mp.start_processes(_rank_steps, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == STEPS
    for name, t in r0["model"].items():
        assert torch.equal(t, r1["model"][name]), f"{name} differs between the ranks"
    moved = [n for n, t in init.state_dict().items()
             if t.is_floating_point() and not torch.equal(t, r0["model"][n])]
    assert len(moved) > len(r0["model"]) // 2, "the group did not train"
    if wide:   # refitted on rank 0 from both ranks' lists, not stepped by the optimizer
        # (the synthetic requests carry no organic topics: wide_topic has no rows)
        still = [k for k in ("item_bias", "wide_item", "wide_context")
                 if torch.equal(init.state_dict()[f"value.{k}"], r0["model"][f"value.{k}"])]
        assert still == [], still
        assert r0["refits"] == r1["refits"] == STEPS


def test_world_size_settings_come_from_torchrun_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from learner.distributed import resolve

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "29511")
    s = resolve(LearnerSettings())
    assert (s.rank, s.world_size, s.master_addr, s.master_port) == (1, 3, "10.0.0.5", 29511)
    explicit = resolve(LearnerSettings(rank=0, world_size=2))
    assert (explicit.rank, explicit.world_size) == (0, 2)
