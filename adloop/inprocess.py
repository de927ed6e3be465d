"""The serving path in-process: the learner's snapshot export, the server's model manager
and ranking engine (exploration included), with no HTTP and no Kafka in between.

The closed-loop harness serves the generative policies through this, so what it
measures is what ``adloop serve`` would answer for the same snapshot: the ONNX graphs
in ONNX Runtime, the server's trie over servable ads, its constrained beam search and
its value ranking. A snapshot is exported when the learner publishes; ads placed in the
id space since (new ads) reach serving through an id-table update of the serving
snapshot (:func:`learner.export.export_ids_update`), as fast as a catalogue refresh.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from learner.export import export_ids_update, export_snapshot
from learner.model import GenerativeRecommender
from learner.tokenizer import UASIDTokenizer
from server.catalog import AdCatalog
from server.engine import Engine, RecRequest, RecResult
from server.explore import Explorer
from server.exposure import ExposureCounter
from server.models import ModelManager
from server.runtime import resolve_provider
from server.settings import ServerSettings
from streams.schemas import Ad


class InProcessServer:
    """Snapshots in ``work_dir`` (a temporary directory when None), served by
    :class:`server.models.ModelManager` and ranked by :class:`server.engine.Engine`,
    which keeps up to ``log_beams`` final beams per result (``adloop serve``'s
    ``log_beams``) and scores a servable catalogue of at most ``score_catalogue_max``
    ads whole (None: ``adloop serve``'s setting, ``ADLOOP_SERVER_SCORE_CATALOGUE_MAX``
    included, so the harness serves as the live server does)."""

    def __init__(self, work_dir: Path | None = None, threads: int = 0,
                 provider: str = "cpu", explore: float = 0.0, explore_max_shown: int = 50,
                 seed: int | None = None, log_beams: int = 32,
                 score_catalogue_max: int | None = None) -> None:
        self._temporary = work_dir is None
        self.work_dir = Path(work_dir if work_dir is not None
                             else tempfile.mkdtemp(prefix="adloop-serve-"))
        self.store = self.work_dir / "snapshots"
        self.catalog = AdCatalog()
        self.manager = ModelManager(self.catalog, resolve_provider(provider),
                                    self.work_dir / "cache", keep_versions=2,
                                    intra_op_threads=threads)
        self.explorer = Explorer(explore, explore_max_shown, self.catalog, seed=seed)
        if score_catalogue_max is None:     # as adloop serve is configured
            score_catalogue_max = ServerSettings().score_catalogue_max
        self.exposure = ExposureCounter()
        """What this server showed each user (the value heads' exposure input)."""
        self.engine = Engine(self.manager, self.catalog, self.explorer, log_beams,
                             score_catalogue_max=score_catalogue_max, exposure=self.exposure)
        self.published = 0
        """Snapshots exported (a learner publish)."""
        self.id_updates = 0
        """Id-table updates (new ads placed since the last snapshot)."""
        self._serving_dir: Path | None = None
        self._n_ids = 0
        self._records: dict[str, Ad] = {}

    @property
    def version(self) -> str | None:
        return self.manager.version

    def sync_catalog(self, records: Iterable[Ad]) -> None:
        """Apply the ads whose record changed (status, budget, bid) since the last call."""
        changed = [(r.ad_id, r) for r in records if self._records.get(r.ad_id) is not r]
        if not changed:
            return
        for ad_id, r in changed:
            self._records[ad_id] = r
        if self.catalog.apply(changed):
            self.manager.on_catalog_change()

    def _load(self, directory: Path) -> str:
        result = self.manager.load_directory(directory)
        if result != "ok":
            raise RuntimeError(f"snapshot {directory.name} was refused: {result}")
        if self._serving_dir is not None and self._serving_dir != directory:
            shutil.rmtree(self._serving_dir, ignore_errors=True)
        self._serving_dir = directory
        return directory.name

    def publish(self, model: GenerativeRecommender, tok: UASIDTokenizer) -> str:
        """Export ``model`` in ``tok``'s id space as the next version and serve it."""
        version = f"v{self.published + self.id_updates + 1:06d}"
        export_snapshot(model, tok, self.store / version, version)
        self.published += 1
        self._n_ids = len(tok)
        return self._load(self.store / version)

    def update_ids(self, tok: UASIDTokenizer) -> str | None:
        """Serve the current graphs with ``tok``'s id table when it has grown."""
        n = len(tok)
        if self._serving_dir is None or n == self._n_ids:
            return None
        version = f"v{self.published + self.id_updates + 1:06d}"
        export_ids_update(self._serving_dir, tok, self.store / version, version)
        self.id_updates += 1
        self._n_ids = n
        return self._load(self.store / version)

    def level0_codes(self) -> int:
        """Distinct level-0 codes among the servable ads of the serving snapshot."""
        state = self.manager.state
        if state is None:
            return 0
        off = state.trie.offsets[0]
        return int(off[1] - off[0])

    def servable(self) -> int:
        state = self.manager.state
        return state.trie.n_ads if state is not None else 0

    def rank(self, requests: list[RecRequest],
             widths_for: Callable[[int, int], list[int]]) -> list[RecResult]:
        return self.engine.run(requests, widths_for)

    def retrieve(self, requests: list[RecRequest],
                 widths_for: Callable[[int, int], list[int]]) -> list[list[str]]:
        """The beams' ads alone per request (:meth:`server.engine.Engine.retrieve`)."""
        return self.engine.retrieve(requests, widths_for)

    def close(self) -> None:
        """Remove the snapshots when the work directory was a temporary one."""
        if self._temporary:
            shutil.rmtree(self.work_dir, ignore_errors=True)
