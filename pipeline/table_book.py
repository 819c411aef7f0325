"""The scheduler's side of keyed stages (``keyed.py``): when each keyed stage's table is built, what is held until it
is, and what is voided when the input it was built from changed.

``ShardBook`` owns one ``KeyedTables`` and calls four hooks: ``hold`` (a shard reached a stage: hold it while the
stage's table is not done), ``input_grew`` (a shard was committed upstream: the table may start), ``upstream_failed``
(a shard was given up: a keyed stage after it can never have its whole input) and the unit outcomes. Per keyed stage,
a ``TableBook`` goes ``waiting`` (for the stage's whole input) -> ``building`` (its units queued, committed, retried)
-> ``done`` (held shards released), or ``failed`` for this run (every shard of the stage reported failed).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .keyed import (TableRef, committed_units, input_fingerprint, read_manifest, read_unit_markers, table_dir,
                    void_table, write_manifest)
from .shards import void_shard

if TYPE_CHECKING:
    from .scheduler import ShardBook

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TableTask:
    """One unit of a keyed stage's table, computed from the stage's whole input (``input_dir``, shards
    ``0..num_shards-1``, all committed) and committed into ``table.dir``."""

    stage: int
    unit: int
    table: TableRef
    input_dir: str
    num_shards: int
    alone: bool = False  # a retry: run it by itself on an idle worker
    repair: str | None = None  # a committed unit whose failed values are computed again (``run.redo_errors``)


class TableBook:
    """The table of one keyed stage (see the module docstring for its phases)."""

    def __init__(self, ref: TableRef, input_dir: Path, num_shards: int, redo_errors: str = "transient"):
        self.ref = ref
        self.redo_errors = redo_errors
        self.repairs: set[int] = set()  # committed units queued to have their failed values computed again
        self.input_dir = input_dir
        self.num_shards = num_shards
        self.phase = "waiting"
        self.committed: set[int] = set()
        self.ready: deque[int] = deque()
        self.held: list[int] = []
        self.attempts: dict[int, int] = {}
        self.failure: str | None = None

    def manifest(self) -> dict:
        return {"units": self.ref.units, "input": input_fingerprint(self.input_dir, self.num_shards)}

    def void(self) -> None:
        void_table(self.ref.dir)
        self.committed = set()

    def start(self) -> None:
        """The input is complete: keep the units built from this very input, void the rest, queue what is missing."""
        manifest = self.manifest()
        if read_manifest(self.ref.dir) != manifest:
            self.void()
            write_manifest(self.ref.dir, manifest["units"], manifest["input"])
        self.committed = committed_units(self.ref.dir, self.ref.units)
        self.repairs = self.units_to_repair() & self.committed
        self.ready = deque(u for u in range(self.ref.units) if u not in self.committed or u in self.repairs)
        self.phase = "building" if self.ready else "done"

    def units_to_repair(self) -> set[int]:
        """Committed units holding values that failed in a way this run redoes (``run.redo_errors``: the transient
        failures by default, as for records)."""
        field = {"transient": "errors_transient", "all": "errors"}.get(self.redo_errors)
        if field is None:
            return set()
        return {u for u, m in read_unit_markers(self.ref.dir).items() if u < self.ref.units and m.get(field)}


class KeyedTables:
    """The tables of a plan's keyed stages, driven by ``ShardBook``'s hooks."""

    def __init__(self, book: "ShardBook"):
        self.book = book
        self.tables: dict[int, TableBook] = {}
        for k, s in enumerate(book.stages):
            if s.cls.keyed():
                self.tables[k] = TableBook(TableRef(str(table_dir(s.dir)), s.config.resources.table_units),
                                           book.plan.ingest.dir if k == 0 else book.stages[k - 1].dir,
                                           book.num_shards, book.redo_errors)
                self._check(k)

    def ref(self, k: int) -> TableRef | None:
        table = self.tables.get(k)
        return table.ref if table else None

    def _input_complete(self, k: int) -> bool:
        """Every input shard of stage ``k`` is committed and none is still to be repaired in this run."""
        book = self.book
        return k == 0 or (all(i in book.committed[k - 1] for i in range(book.num_shards))
                          and not any(j == k - 1 for j, _ in book.repairs | book.expect_repair))

    def input_will_change(self) -> None:
        """After the run is planned: a complete keyed stage whose input is about to be repaired waits for those repairs
        (its shards' repairs are held), then its table is rebuilt from the repaired input (``TableBook.start``)."""
        for k, table in self.tables.items():
            if table.phase == "done" and not self._input_complete(k):
                table.phase = "waiting"

    def _check(self, k: int) -> None:
        """Before the run: a keyed stage's outputs are valid only with the table built from its current input. When
        that input is incomplete (a shard of it is about to be recomputed) or changed since the table was built, the
        table and the stage's committed shards are voided, with what was made from them downstream."""
        book, table, stage = self.book, self.tables[k], self.book.stages[k]
        all_done = all(i in book.committed[k] for i in range(book.num_shards))
        if self._input_complete(k) and (all_done or read_manifest(table.ref.dir) == table.manifest()):
            # a complete stage whose table holds failures to redo waits for the table's repair (input_grew)
            table.phase = "done" if all_done and not table.units_to_repair() else "waiting"
            return
        if book.committed[k] or read_manifest(table.ref.dir):
            log.warning("%s: its input changed since its keyed table was built: the table and the stage's %d "
                        "committed shards are rebuilt", stage.name, len(book.committed[k]))
        table.void()
        for shard in sorted(book.committed[k]):
            void_shard(stage.dir, shard)
            book._void_downstream(k, shard)
        book.committed[k] = set()

    # --- ShardBook's hooks -------------------------------------------------------------------------------------------

    def hold(self, k: int, shard: int) -> bool:
        """Shard ``shard`` reached stage ``k``: True when the table takes care of it (held until the table is done,
        or given up because the table failed), False when it may be queued now."""
        table = self.tables.get(k)
        if table is None or table.phase == "done":
            return False
        if table.phase == "failed":
            self.book.give_up(k, shard, table.failure or "keyed table failed")
        else:
            table.held.append(shard)
        return True

    def input_grew(self, k: int) -> None:
        """Stage ``k``'s input may now be complete: start building its table."""
        table = self.tables.get(k)
        if table is None or table.phase != "waiting" or not self._input_complete(k):
            return
        table.start()
        sp = self.book.progress[self.book.stages[k].name]
        sp.units_total, sp.units_done = table.ref.units, len(table.committed)
        if table.phase == "done":
            self._release(k)
        else:
            log.info("%s: building its keyed table (%d units) from its whole input", self.book.stages[k].name,
                     table.ref.units)

    def upstream_failed(self, k: int, shard: int) -> None:
        """Shard ``shard`` of stage ``k`` was given up: a keyed stage after it cannot have its whole input."""
        name = self.book.stages[k].name
        for j, table in self.tables.items():
            if j > k and table.phase == "waiting":
                log.error("%s: its keyed table needs the whole input; %s shard %d failed, so it waits for a rerun",
                          self.book.stages[j].name, name, shard)
                self._fail(j, f"keyed table needs the whole input: upstream {name} shard {shard} failed")

    def ready(self, k: int) -> deque[int]:
        table = self.tables.get(k)
        return table.ready if table else deque()

    def task(self, k: int) -> TableTask:
        """The next ready unit of stage ``k``'s table as a task (not yet taken from the queue)."""
        table = self.tables[k]
        unit = table.ready[0]
        return TableTask(k, unit, table.ref, str(table.input_dir), table.num_shards,
                         alone=table.attempts.get(unit, 0) > 0,
                         repair=table.redo_errors if unit in table.repairs else None)

    def unit_committed(self, k: int, unit: int) -> None:
        table = self.tables[k]
        table.repairs.discard(unit)
        table.committed.add(unit)
        self.book.progress[self.book.stages[k].name].units_done = len(table.committed)
        if len(table.committed) == table.ref.units and not table.repairs and table.phase == "building":
            log.info("%s: keyed table complete", self.book.stages[k].name)
            self._release(k)

    def unit_failed(self, k: int, unit: int, error: str, max_attempts: int) -> bool:
        """Count a failed unit; True when queued again, False when the table (and so the stage) is given up."""
        table = self.tables[k]
        n = table.attempts[unit] = table.attempts.get(unit, 0) + 1
        name = self.book.stages[k].name
        if n < max_attempts:
            log.warning("%s table unit %d failed (attempt %d/%d): %s; retrying", name, unit, n, max_attempts, error)
            table.ready.appendleft(unit)
            return True
        if unit in table.repairs:  # the unit stays committed as it was: its failures stay failures
            log.error("%s table unit %d: its repair failed %d times; it stays as committed: %s", name, unit, n, error)
            self.unit_committed(k, unit)
            return False
        log.error("%s table unit %d failed %d times, giving up the stage for this run: %s", name, unit, n, error)
        self._fail(k, f"keyed table unit {unit} failed: {error}")
        return False

    def _release(self, k: int) -> None:
        table = self.tables[k]
        table.phase = "done"
        self.book.ready[k].extend(sorted(table.held))
        table.held.clear()

    def _fail(self, k: int, reason: str) -> None:
        table = self.tables[k]
        table.phase, table.failure = "failed", reason
        table.ready.clear()
        for shard in table.held:
            self.book.give_up(k, shard, reason)
        table.held.clear()
