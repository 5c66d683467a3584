"""The driver's working set: what it keeps in memory about cells, bounded by the cells it is working on.

The run database holds every cell and every evaluation; the driver needs only a few of them at a time: the
population (parents are drawn from it, and its members' scores rank it), the cells of the active steps (their units
carry the cell's description; their gates read the cell's best scores) and the reference cell (every ratio divides
by its best). Keeping every cell's description, parent and best scores for the whole run made the driver grow by
about 1.8 kB per cell (results/scale/dispatch.md): 90 MB at 50,000 cells, and no bound. These classes keep the
working set and read the rest from the database on a miss, one indexed read per cell: ``CellCache`` the
descriptions, ``CellScores`` a score per cell and task (``BestScores`` the best; the driver's promotion-rung scores,
read off a cell's learning curves, are another).

Contract: all are caches over the database, never the record. Anything put here has already been written there
(a cell row by ``start_step``, a score by ``commit_unit``), so a miss, an eviction or a rebuild after a crash
reads back the same values. The one per-cell structure left in the driver is the duplicate index
(:class:`cellsearch.dedup.Deduplicator`: two hashes per distinct cell), which must see every cell.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterable, Mapping

from cellsearch.search.storage import RunStorage


class CellCache:
    """Cell hash -> (description as spec JSON, parent hash), for the ``capacity`` most recently used cells, read
    from the run database on a miss. A parent is a population member and a unit's cell is an active step's, so
    with a capacity of a few populations nearly every read hits."""

    def __init__(self, storage: RunStorage, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._storage = storage
        self._capacity = capacity
        self._entries: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        #: Reads that went to the database (a miss), for benchmarks and tests.
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, cell_hash: str, spec_json: str, parent_hash: str | None) -> None:
        """Remember a cell whose row the database holds (or is about to hold, in the same step's write)."""
        self._entries[cell_hash] = (spec_json, parent_hash)
        self._entries.move_to_end(cell_hash)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def _entry(self, cell_hash: str) -> tuple[str, str | None] | None:
        entry = self._entries.get(cell_hash)
        if entry is not None:
            self._entries.move_to_end(cell_hash)
            return entry
        self.misses += 1
        row = self._storage.cell_description(cell_hash)
        if row is None:
            return None
        self.put(cell_hash, row["spec_json"], row["parent_hash"])
        return self._entries[cell_hash]

    def spec_json(self, cell_hash: str) -> str:
        """The cell's description; KeyError for a cell the run does not hold."""
        entry = self._entry(cell_hash)
        if entry is None:
            raise KeyError(cell_hash)
        return entry[0]

    def parent(self, cell_hash: str) -> str | None:
        """The cell's parent hash (None for an initial cell, or a cell the run does not hold)."""
        entry = self._entry(cell_hash)
        return None if entry is None else entry[1]

    def known(self, cell_hash: str) -> bool:
        """Whether the run holds a row for the cell (a candidate, a duplicate or an initial cell)."""
        return self._entry(cell_hash) is not None


class CellScores:
    """(cell hash, task) -> a score, for the cells in use: a cell's scores are read (``load(cell_hash)``, from the
    database) the first time one of them is asked for, updated as its units commit (:meth:`record`: the larger
    value is kept), and dropped by :meth:`retain`. A mapping for :func:`cellsearch.scoring.score_of` (``get``)."""

    def __init__(self, load: Callable[[str], Mapping[tuple[str, str], float]]):
        self._read = load
        self._scores: dict[tuple[str, str], float] = {}
        self._loaded: set[str] = set()
        #: Cells read from the database, for benchmarks and tests.
        self.loads = 0

    def _load(self, cell_hash: str) -> None:
        if cell_hash not in self._loaded:
            self._loaded.add(cell_hash)
            self.loads += 1
            self._scores.update(self._read(cell_hash))

    def get(self, key: tuple[str, str], default: float | None = None) -> float | None:
        self._load(key[0])
        return self._scores.get(key, default)

    def __getitem__(self, key: tuple[str, str]) -> float:
        self._load(key[0])
        return self._scores[key]

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        self._load(key[0])
        return key in self._scores

    def __len__(self) -> int:
        """The scores held in memory now (not the run's)."""
        return len(self._scores)

    def cells(self) -> frozenset[str]:
        """The cells whose scores are held now."""
        return frozenset(self._loaded)

    def record(self, cell_hash: str, task: str, score: float) -> None:
        """A score just committed to the database (so ``load`` reads it too): the larger of the two is kept."""
        self._load(cell_hash)
        key = (cell_hash, task)
        self._scores[key] = max(self._scores.get(key, -math.inf), score)

    def retain(self, cells: Iterable[str]) -> None:
        """Drop every cell's scores but ``cells``' (they are read again if asked for)."""
        keep = set(cells)
        dropped = self._loaded - keep
        if dropped:
            self._loaded -= dropped
            self._scores = {key: value for key, value in self._scores.items() if key[0] not in dropped}


class BestScores(CellScores):
    """(cell hash, task) -> the best committed score (partial ones excluded), as ``RunStorage.best_scores`` reads
    it, for the cells in use (see :class:`CellScores`)."""

    def __init__(self, storage: RunStorage):
        super().__init__(lambda cell_hash: storage.best_scores(cell_hash=cell_hash))
