"""``run_stage``: a stage on in-memory records, the way a worker runs it (for tests, here and in plugins)."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable

from ..keyed import InMemoryTable
from ..schema import records_to_table, table_to_records
from ..stage import Record, Stage, StageConfig, StageContext, check_contract
from ..worker import run_batch, start_stage, stop_stage, table_items


def run_stage(stage_cls: type[Stage], records: Iterable[Record], config: StageConfig | dict[str, Any] | None = None,
              *, llm: Any = None, context: StageContext | dict[str, Any] | None = None,
              batch_size: int | None = None, schema_check: bool = True,
              counters: dict[str, int] | None = None) -> list[Record]:
    """Run ``stage_cls`` over ``records`` and return its output records.

    What a worker does, in this process: the LLM roles the stage declares are resolved from ``llm`` (an ``LLMConfig``
    or its dict; a role without endpoints starts the embedded server, as in a run), the stage is built with
    ``context`` (an ``StageContext`` or its fields), ``setup()`` runs once, a keyed stage's table is built over all
    the records (one unit), the records go through in batches of
    ``batch_size`` (default: the config's) with the framework's handling (active records only, lineage, a raising
    batch retried record by record), then ``close()``. Inputs are not modified. With ``schema_check`` the output is
    written to an Arrow table with the record schema and read back, as the shard writer would: a field the schema
    does not have, or a value of the wrong type, fails here rather than in a run. ``counters``, when given, is
    filled with what the stage counted (``Stage.count``), as a commit marker's ``counters`` would be.
    """
    cfg = config if isinstance(config, StageConfig) else stage_cls.Config.model_validate(config or {})
    ctx = context if isinstance(context, StageContext) else StageContext(**(context or {}))
    records = [copy.deepcopy(r) for r in records]
    roles = stage_cls.llm_roles(cfg)
    if roles:
        from ..llm.services import llm_services

        services: contextlib.AbstractContextManager = llm_services(llm, roles)
    else:
        services = contextlib.nullcontext(None)
    with services as resolved:
        if resolved is not None:
            stage_cls.preflight_llm(cfg, resolved)
        stage = start_stage(stage_cls, cfg, ctx.model_copy(update={"llm": resolved}) if resolved else ctx)
        try:
            if stage_cls.keyed():  # the table pass over all the records, as one unit, then the join
                stage.attach_table(InMemoryTable(stage.compute_table(table_items(stage, records))))
            size = batch_size or cfg.batch_size
            out: list[Record] = []
            for start in range(0, len(records), size):
                out += run_batch(stage, records[start:start + size])
            if counters is not None:
                counters.update(stage.take_counters())
        finally:
            stop_stage(stage)
    check_contract(records, out, stage_cls.name)
    return table_to_records(records_to_table(out)) if schema_check else out
