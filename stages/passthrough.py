"""A stage that passes records through unchanged (the framework adds its lineage entry).

Useful to measure the runner's own overhead, to smoke-test a cluster, and in the runner's fault tests:
``sleep_per_record`` makes work slow enough to interrupt, ``fail_ids`` makes the stage raise on chosen records,
``crash_ids`` kills its worker process there, ``freeze_ids`` stops it (SIGSTOP: a hung worker, for the watchdog) and
``abort_ids`` fails the whole shard (a stage bug). With ``once_dir`` each fault happens once per record id (a flag file
there), so the retry of the shard goes through.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydantic import Field

from gmner_pipeline.stage import Record, Stage, StageConfig, StageContractError


class PassthroughConfig(StageConfig):
    sleep_per_record: float = Field(0.0, ge=0, description="seconds to sleep per record (simulated work)")
    fail_ids: list[str] = Field(default_factory=list, description="raise on these record ids (fault tests)")
    crash_ids: list[str] = Field(default_factory=list,
                                 description="kill the worker process on these ids, like an OOM kill (fault tests)")
    freeze_ids: list[str] = Field(default_factory=list,
                                  description="stop the worker process (SIGSTOP) on these ids, like a hung worker")
    abort_ids: list[str] = Field(default_factory=list,
                                 description="fail the whole shard on these ids (a stage bug, not a record error)")
    once_dir: str | None = Field(None, description="each fault happens once per id: a flag file in this folder")


class PassthroughStage(Stage):
    name = "passthrough"
    version = "1"
    Config = PassthroughConfig
    reads = frozenset()
    writes = frozenset()

    config: PassthroughConfig

    def process(self, records: list[Record]) -> list[Record]:
        cfg = self.config
        for rec in records:
            if rec["id"] in cfg.crash_ids and self._first_time("crash", rec["id"]):
                os._exit(17)
            if rec["id"] in cfg.freeze_ids and self._first_time("freeze", rec["id"]):
                os.kill(os.getpid(), signal.SIGSTOP)
            if rec["id"] in cfg.abort_ids and self._first_time("abort", rec["id"]):
                raise StageContractError(f"passthrough was told to abort its shard on {rec['id']}")
            if rec["id"] in cfg.fail_ids:
                raise ValueError(f"passthrough was told to fail on {rec['id']}")
            if cfg.sleep_per_record:
                time.sleep(cfg.sleep_per_record)
        return records

    def _first_time(self, fault: str, record_id: str) -> bool:
        """True unless ``once_dir`` says this fault already happened for this record."""
        if not self.config.once_dir:
            return True
        flag = Path(self.config.once_dir) / f"{fault}-{record_id.replace('/', '_')}"
        if flag.exists():
            return False
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("done")
        return True
