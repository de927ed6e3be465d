"""Data-parallel ``adloop learn --world-size N`` on ``torch.distributed``.

Each rank is a whole learner process (:class:`RankService`, a :class:`LearnerService`)
that consumes its own partitions of ``feedback`` (round-robin: rank r takes the r-th,
(r+N)-th, ... partition) and trains a full replica of the model. The ranks move in
lockstep, one control exchange per loop step:

1. every rank polls its partitions and classifies the records (ledger entries, pending
   lists), rank 0 also reads ``ads``;
2. ``all_gather_object`` of a small :class:`StepView` per rank: pending lists, whether
   its batch is full or waited long enough, whether it was asked to stop, and from rank 0
   the ids it gave new ads plus its publish/checkpoint clocks. Every rank takes the same
   decisions from the same views;
3. a training step (any rank's batch is ready): every rank computes gradients on its own
   lists, :class:`AllReduceAdamW` all-reduces them weighted by list count (a rank with
   no lists contributes zero with weight 0), clips the averaged gradient and steps:
   identical gradients and optimizer states keep the replicas identical; the value head's
   linear terms are refitted on rank 0 from every rank's shown items and broadcast
   (:func:`refit_on_rank0`);
4. a publish: rank 0 alone exports, guards and stores (or, after the live A/B test
   found the online bucket worse, re-announces an earlier version), then broadcasts the
   outcome with the weights to train on from after a refusal or a rollback; every rank
   loads those and refreshes π_ref when a version was stored;
5. a checkpoint: every rank sends rank 0 its consumer positions, ledger records, the
   ``seen`` table of its requests and a digest of its parameters; rank 0 checks the
   digests agree and writes one ledger segment and one checkpoint holding every rank's
   positions, then broadcasts the sequence number. Nobody consumes between sending its
   positions and the checkpoint being durable.

A rank that dies (``kill -9``) or hangs makes the others fail their next collective
(a closed socket at once, a hang after ``--dist-timeout-s``): they exit non-zero, the
launcher stops the rest and exits non-zero, and the restart resumes every rank from the
checkpoint's positions, so each feedback offset is trained exactly once.

Launching: ``--world-size N`` without ``--rank`` starts N rank processes on this host
(:func:`launch`, a free rendezvous port on ``--master-addr``); ``--rank R --world-size
N --master-addr A --master-port P`` (or torchrun's ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT``) runs one rank of a group started elsewhere. All ranks
read ``--state-dir`` at start (one host, or a shared volume); only rank 0 writes it.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from kafka.errors import KafkaError

from learner.beam import IdTrie
from learner.model import GenerativeRecommender
from learner.online import (
    KAFKA_ERRORS,
    UPDATES,
    LearnerService,
    LearnerSettings,
    LedgerError,
)
from learner.rspo_step import LinearSync, OnlineLearner
from learner.value_fit import Impressions, OnlineLinear
from streams.logs import get_logger
from streams.metrics import start_metrics_server
from streams.schemas import Feedback

log = get_logger(__name__)


class RankFailedError(RuntimeError):
    """The data-parallel group cannot go on (a rank diverged or is gone)."""


def resolve(s: LearnerSettings) -> LearnerSettings:
    """``s`` with rank, world size and rendezvous address from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) where flags left them."""
    env = os.environ
    if s.rank is not None or "RANK" not in env or "WORLD_SIZE" not in env:
        return s
    return s.model_copy(update={
        "rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
        "master_addr": env.get("MASTER_ADDR", s.master_addr),
        "master_port": int(env.get("MASTER_PORT", s.master_port))})


def pick_backend(requested: str, world_size: int) -> str:
    """gloo on CPU; nccl when every rank on this host can have a GPU of its own."""
    if requested != "auto":
        return requested
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local \
        else "gloo"


class Group:
    """The process group: gradient all-reduce on ``backend`` (gloo or nccl), control
    objects (views, checkpoint parts, outcomes) on gloo, every wait bounded by
    ``timeout_s``."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 backend: str = "gloo", timeout_s: float = 120.0) -> None:
        self.rank, self.world_size, self.backend = rank, world_size, backend
        timeout = timedelta(seconds=timeout_s)
        # env:// so that under torchrun the agent's rendezvous store is joined, not bound
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
        dist.init_process_group(backend, init_method="env://", rank=rank,
                                world_size=world_size, timeout=timeout)
        self.control: Any = None if backend == "gloo" else dist.new_group(
            backend="gloo", timeout=timeout)
        self.device = torch.device("cpu")
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", rank))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        log.info("learner.group_joined", rank=rank, world_size=world_size, backend=backend,
                 timeout_s=timeout_s)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over the ranks (a new CPU tensor)."""
        buf = t.to(self.device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class AllReduceAdamW(torch.optim.AdamW):
    """AdamW whose ``step`` first replaces every gradient by the list-weighted mean over
    the ranks, ``sum_r lists_r * g_r / sum_r lists_r``, then clips that mean to
    ``grad_clip`` (the learner's own clip is set to ``inf``, so clipping happens once,
    after the reduction). Set :attr:`lists` before each step; a rank without lists steps
    with ``lists = 0`` and no gradients. A parameter keeps no gradient when no rank had
    one (AdamW leaves it alone, as in one process). When no rank had lists nothing moves.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], group: Group,
                 grad_clip: float, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.group = group
        self.grad_clip = grad_clip
        self.lists = 0.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        params = [p for g in self.param_groups for p in g["params"]]
        w = float(self.lists)
        self.lists = 0.0
        parts = [p.grad.reshape(-1).float() * w if p.grad is not None and w > 0
                 else torch.zeros(p.numel()) for p in params]
        has = torch.tensor([float(p.grad is not None and w > 0) for p in params])
        flat = self.group.all_reduce_sum(torch.cat([*parts, has, torch.tensor([w])]))
        total = float(flat[-1])
        if total <= 0:
            for p in params:
                p.grad = None
            return None
        had = flat[-1 - len(params):-1]
        off = 0
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = (flat[off:off + n] / total).view_as(p).to(p.dtype).clone() \
                if had[i] > 0 else None
            off += n
        with_grad = [p for p in params if p.grad is not None]
        if with_grad and math.isfinite(self.grad_clip):
            torch.nn.utils.clip_grad_norm_(with_grad, self.grad_clip)
        return super().step(closure)


def make_data_parallel(learner: OnlineLearner, group: Group) -> OnlineLearner:
    """Swap ``learner``'s optimizer for an :class:`AllReduceAdamW` with the same
    hyper-parameters and parameters (before loading any optimizer state), and refit the
    value head's linear terms once for the group (:func:`refit_on_rank0`)."""
    d = learner.opt.defaults
    params = [p for g in learner.opt.param_groups for p in g["params"]]
    learner.opt = AllReduceAdamW(
        params, group, learner.grad_clip, lr=d["lr"], betas=d["betas"],
        eps=d["eps"], weight_decay=d["weight_decay"], amsgrad=d["amsgrad"])
    learner.grad_clip = math.inf
    learner.linear_sync = refit_on_rank0(group)
    return learner


def refit_on_rank0(group: Group) -> LinearSync:
    """The group's :data:`learner.rspo_step.LinearSync`: every rank sends rank 0 the items
    its lists showed, rank 0 adds them all (in rank order) and refits the linear terms,
    and broadcasts the tables, which every other rank loads: the same refit one process
    would run on the union of the lists, and identical tables on every rank."""

    def sync(linear: OnlineLinear, rows: Impressions | None) -> dict[str, float]:
        parts = group.gather(rows)
        out: tuple[dict[str, float], dict[str, torch.Tensor] | None] | None = None
        if group.rank == 0:
            assert parts is not None
            got = [p for p in parts if p is not None]
            out = ({}, None)        # no rank showed anything: the tables stay as they are
            if got:
                out = (linear.refit_with(Impressions.cat(got)),
                       {k: t.detach().clone() for k, t in linear.head.linear_tables().items()})
        stats, tables = group.broadcast(out)
        if group.rank != 0 and tables is not None:
            linear.load(tables)
        return stats

    return sync


def step_without_lists(learner: OnlineLearner) -> None:
    """This rank's part of a group step it has no lists for (weight 0)."""
    assert isinstance(learner.opt, AllReduceAdamW)
    learner.model.train()
    learner.opt.zero_grad(set_to_none=True)
    learner.opt.lists = 0.0
    learner.opt.step()
    if learner.linear is not None:
        learner.linear_sync(learner.linear, None)
    learner.steps += 1


def params_digest(model: GenerativeRecommender) -> int:
    """CRC-32 of every parameter and buffer (equal on every rank, or they diverged)."""
    crc = 0
    for t in model.state_dict().values():
        crc = zlib.crc32(t.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc


@dataclass
class StepView:
    """What one rank tells the others at every loop step."""

    pending: int
    ready: bool
    """Its batch is full, or its oldest pending list waited ``--max-wait-s``."""
    stop: bool
    ledger: bool
    publish_due: bool = False
    """Rank 0: ``--snapshot-every-s`` has passed since the last publish."""
    checkpoint_due: bool = False
    """Rank 0: ``--checkpoint-every-s`` has passed since the last checkpoint."""
    new_ids: dict[str, list[int]] = field(default_factory=dict)
    """Rank 0: ids given to new ads since the last step (the others bind the same)."""
    rollback_due: bool = False
    """Rank 0: the live A/B test decided online_worse (every rank rolls back now)."""


@dataclass
class RankPart:
    """One rank's share of a checkpoint, gathered on rank 0."""

    positions: dict[int, int]
    ledger: list[dict[str, Any]]
    seen: list[tuple[str, tuple[float, list[float]]]]
    digest: int


class RankService(LearnerService):
    """One rank of the data-parallel learner (see the module docstring)."""

    def __init__(self, s: LearnerSettings) -> None:
        assert s.rank is not None
        self.rank = s.rank
        self.world_size = s.world_size
        self.group = Group(s.rank, s.world_size, s.master_addr, s.master_port,
                           pick_backend(s.dist_backend, s.world_size), s.dist_timeout_s)
        self.group_stop = False
        self.stop = threading.Event()
        self.tok_known = 0
        super().__init__(s)
        if self.rank != 0:
            self.pending_update = None   # rank 0 announces
        self.tok_known = len(self.tok)

    def _learner(self, model: GenerativeRecommender) -> OnlineLearner:
        return make_data_parallel(super()._learner(model), self.group)

    def learner_trie(self) -> IdTrie | None:
        """Every id the tokenizer knows, on every rank: only rank 0 reads ``ads`` and so
        knows which are servable, and all ranks must take the same log-probs."""
        if not self.s.trie_logprobs or len(self.tok) == 0:
            return None
        key = (-1, len(self.tok))
        if self._trie is None or self._trie[0] != key:
            _, ids = self.tok.id_array()
            self._trie = (key, IdTrie(ids, self.tok.config.token_sizes))
        return self._trie[1]

    def my_partitions(self, parts: list[int]) -> list[int]:
        mine = parts[self.rank::self.world_size]
        if not mine:
            log.warning("learner.rank_without_partitions", rank=self.rank,
                        partitions=len(parts), world_size=self.world_size)
        log.info("learner.rank_partitions", rank=self.rank, partitions=mine)
        return mine

    # -- ads: rank 0 reads them and hands the ids to the others --------------------------
    def poll_ads(self, timeout_ms: int = 0, until_end: bool = False) -> None:
        if self.rank == 0:
            super().poll_ads(timeout_ms, until_end)

    def _new_ids(self) -> dict[str, list[int]]:
        table = self.tok.table()
        if len(table) == self.tok_known:
            return {}
        new = dict(list(table.items())[self.tok_known:])
        self.tok_known = len(table)
        return new

    def _bind_ids(self, ids: dict[str, list[int]]) -> None:
        for ad_id, sid in ids.items():
            if ad_id not in self.tok:
                self.tok._bind(ad_id, tuple(sid))
        self.tok_known = len(self.tok)

    # -- the lockstep loop ---------------------------------------------------------------
    def start(self) -> None:
        super().start()
        log.info("learner.rank_started", rank=self.rank, world_size=self.world_size)

    def step(self, poll_timeout_ms: int = 200) -> None:
        if self.rank == 0 and self.pending_update is not None:
            self._announce_or_retry()
        room = max(1, self.s.batch_lists - len(self.pending))
        try:
            batch = self.consumer.poll(poll_timeout_ms, max_records=room)
        except KafkaError as exc:   # this step without new records; the group goes on
            KAFKA_ERRORS.inc()
            log.warning("learner.kafka_unavailable", error=repr(exc)[:300])
            batch = []
        self.handle(batch)
        now = time.monotonic()
        mine = StepView(
            pending=len(self.pending),
            ready=len(self.pending) >= self.s.batch_lists or bool(
                self.pending and now - self.pending_since >= self.s.max_wait_s),
            stop=self.stop.is_set(), ledger=bool(self.ledger))
        if self.rank == 0:
            try:
                self.poll_ads()
            except KafkaError as exc:
                KAFKA_ERRORS.inc()
                log.warning("learner.kafka_unavailable", error=repr(exc)[:300])
            mine.publish_due = now - self.last_publish >= self.s.snapshot_every_s
            mine.checkpoint_due = now - self.last_checkpoint >= self.s.checkpoint_every_s
            mine.new_ids = self._new_ids()
            mine.rollback_due = self.rollback_due()
        views: list[StepView] = self.group.all_gather(mine)
        lead = views[0]
        if self.rank != 0:
            self._bind_ids(lead.new_ids)
        self.group_stop = any(v.stop for v in views)
        total = sum(v.pending for v in views)
        if lead.rollback_due:     # online_worse: every rank rolls back now
            if total:
                self.train_pending()
            self.publish()
            return
        if total and (self.group_stop or any(v.ready for v in views)):
            self.train_pending()
        elif total:
            return
        due = (self.updates_since_publish >= self.s.snapshot_every_updates or (
            self.updates_since_publish > 0 and lead.publish_due))
        if due:
            self.publish()
        elif lead.checkpoint_due and (any(v.ledger for v in views)
                                      or self.updates_since_publish):
            self.commit()

    def run(self, stop: threading.Event) -> None:
        self.stop = stop
        self.start()
        while not self.group_stop:
            self.step()
        self.commit()   # the stopping step trained everything pending on every rank
        if self.rank == 0 and self.pending_update is not None:
            self._announce_or_retry()

    # -- training ------------------------------------------------------------------------
    def train_pending(self) -> dict[str, float] | None:
        if self.pending:
            return super().train_pending()
        step_without_lists(self.learner)
        UPDATES.inc()
        self.updates_since_publish += 1
        return None

    def update_model(self, lists: list[tuple[Feedback, float]]) -> dict[str, float]:
        assert isinstance(self.learner.opt, AllReduceAdamW)
        self.learner.opt.lists = float(len(lists))
        return super().update_model(lists)

    # -- publishing: rank 0 alone ---------------------------------------------------------
    def publish(self) -> bool:
        """Rank 0 decides (promote, refuse, hold or roll back) and broadcasts whether a
        version is to be announced and the weights every rank trains on from (after a
        refusal or a rollback), so the replicas stay identical."""
        stored, restart = self.group.broadcast(self.publish_outcome() if self.rank == 0
                                               else None)
        return self.apply_publish_outcome(bool(stored), restart)

    def finish_publish(self) -> None:
        self.commit()
        if self.rank == 0:
            self._announce_or_retry()
        self.updates_since_publish = 0
        self.last_publish = time.monotonic()

    def _announce_or_retry(self) -> None:
        """Rank 0: announce the checkpointed ``pending_update``; on a Kafka error keep it
        for the next step (no collective is involved, so the group goes on)."""
        try:
            self.announce()
        except KafkaError as exc:
            KAFKA_ERRORS.inc()
            log.warning("learner.announce_retry", error=repr(exc)[:300])

    # -- the commit path: every rank's part, one checkpoint by rank 0 --------------------
    def commit(self) -> None:
        if self.pending:
            raise LedgerError("commit with untrained pending lists would skip them")
        self.producer.flush(30)
        positions = self.consumer_positions()
        parts = self.group.gather(RankPart(positions, self.ledger, list(self.seen.items()),
                                           params_digest(self.model)))
        seq, error, ads_checked = self.seq + 1, None, self.ads_checked
        if parts is not None:
            digests = {p.digest for p in parts}
            if len(digests) > 1:
                error = f"replicas diverged: parameter digests {sorted(digests)}"
            else:
                merged = dict(self.positions)
                for p in parts:
                    merged.update(p.positions)
                ads_checked = self.write_state(
                    seq, merged, [r for p in parts for r in p.ledger],
                    [kv for p in parts for kv in p.seen])
        seq, error = self.group.broadcast((seq, error))
        if error is not None:
            log.error("learner.group_failed", rank=self.rank, error=error)
            raise RankFailedError(error)
        self.committed(seq, positions, ads_checked)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.group.close()


def run_rank(s: LearnerSettings) -> int:
    """One rank's process: serve metrics (rank 0's readiness is the group's), train."""
    if s.threads:
        torch.set_num_threads(s.threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    service = RankService(s)
    metrics = start_metrics_server(s.metrics_port, s.metrics_host, lambda: (
        service.ready, {"last_published": service.last_published, "rank": service.rank}))
    log.info("learner.metrics", url=metrics.url, rank=service.rank)
    try:
        service.run(stop)
    except RuntimeError as exc:   # a peer is gone, timed out or diverged: the group stops
        log.error("learner.group_failed", rank=service.rank, error=str(exc)[:500])
        return 1
    finally:
        try:
            service.close()
        finally:
            metrics.stop()
    log.info("learner.rank_stopped", rank=service.rank)
    return 0


# -- the launcher ---------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the rank gets SIGKILL when the launcher dies, even by ``kill -9``."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG


def rank_env(s: LearnerSettings, rank: int, master_port: int) -> dict[str, str]:
    """The environment of rank ``rank``'s process: every setting as ADLOOP_LEARN_*."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"):
        env.pop(k, None)
    for name, value in s.model_dump().items():
        if value is not None:
            env[f"ADLOOP_LEARN_{name.upper()}"] = str(value)
    env.update({"ADLOOP_LEARN_RANK": str(rank), "ADLOOP_LEARN_MASTER_PORT": str(master_port),
                "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(s.world_size)})
    if rank > 0:
        env["ADLOOP_LEARN_METRICS_PORT"] = "0"   # rank 0's port is the group's readiness
    return env


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launch(s: LearnerSettings, grace_s: float = 10.0) -> int:
    """Start ``s.world_size`` ranks here and wait. Exit 0 when every rank stopped cleanly
    (SIGTERM/SIGINT are passed on: the ranks finish the step, checkpoint and exit
    together). When one fails, the others fail their next collective and exit by
    themselves; any still running after ``grace_s`` is killed. Then exit 1, so a
    supervisor restarts the whole group."""
    port = s.master_port or _free_port(s.master_addr)
    procs: list[subprocess.Popen[bytes]] = []
    for r in range(s.world_size):
        procs.append(subprocess.Popen([sys.executable, "-m", "adloop", "learn"],
                                      env=rank_env(s, r, port), preexec_fn=_die_with_parent))
        log.info("learner.rank_launched", rank=r, pid=procs[-1].pid, master_port=port)
    stopping = threading.Event()

    def forward(*_: Any) -> None:
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    failed: int | None = None
    while failed is None and any(p.poll() is None for p in procs):
        for r, p in enumerate(procs):
            rc = p.poll()
            if rc is not None and rc != 0:
                failed = r
                log.error("learner.rank_failed", rank=r, returncode=rc)
                break
        time.sleep(0.1)
    if failed is not None:
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        for r, p in enumerate(procs):
            if p.poll() is None:
                log.error("learner.rank_killed", rank=r, after_s=grace_s)
                p.kill()
                p.wait()
    codes = [p.wait() for p in procs]
    log.info("learner.group_stopped", returncodes=codes, asked_to_stop=stopping.is_set())
    return 0 if failed is None and all(c == 0 for c in codes) else 1
