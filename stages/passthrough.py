"""A stage that passes records through unchanged (the framework adds its lineage entry).

Useful to measure the runner's own overhead, to smoke-test a cluster, and in the runner's fault tests:
``sleep_per_record`` makes work slow enough to interrupt, ``fail_ids`` makes the stage raise on chosen records
and ``crash_ids`` kills its worker process there.
"""

from __future__ import annotations

import os
import time

from pydantic import Field

from gmner_pipeline.stage import Record, Stage, StageConfig


class PassthroughConfig(StageConfig):
    sleep_per_record: float = Field(0.0, ge=0, description="seconds to sleep per record (simulated work)")
    fail_ids: list[str] = Field(default_factory=list, description="raise on these record ids (fault tests)")
    crash_ids: list[str] = Field(default_factory=list,
                                 description="kill the worker process on these ids, like an OOM kill (fault tests)")


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
            if rec["id"] in cfg.crash_ids:
                os._exit(17)
            if rec["id"] in cfg.fail_ids:
                raise ValueError(f"passthrough was told to fail on {rec['id']}")
            if cfg.sleep_per_record:
                time.sleep(cfg.sleep_per_record)
        return records
