"""``latest.json``: the last run's summary, and the one place that turns the folders it names into paths.

Folders inside an output folder are written relative to it (``passthrough/<key>``), so the folder can be moved, copied
or mounted elsewhere and ``status``, ``show``, ``view`` and ``eval`` still find everything. Summaries written before
that hold absolute folders: those are read too, by keeping their last two parts (``<stage>/<key>``) under the output
folder when the absolute path no longer exists. In a bucket (``storage.py``) folders are relative too, so the
summary names no endpoint and the same folder read through another endpoint (or copied to disk) still resolves.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .shards import read_json
from .storage import ObjectPath, location

LATEST = "latest.json"


class OutputNotFound(FileNotFoundError):
    """The output folder, its summary, or a stage folder the summary names is not there; the message says what to do."""


def relative_to_output(output_dir: str | Path, folder: str | Path) -> str:
    """``folder`` as written in files inside ``output_dir``: relative when it lies inside, else absolute."""
    folder, output_dir = location(folder), location(output_dir)  # type: ignore[assignment]
    if isinstance(folder, ObjectPath) or isinstance(output_dir, ObjectPath):
        inside = (isinstance(folder, ObjectPath) and isinstance(output_dir, ObjectPath)
                  and folder.scheme == output_dir.scheme and folder.key.startswith(output_dir.key + "/"))
        return folder.key[len(output_dir.key) + 1:] if inside else str(folder)
    try:
        return Path(os.path.relpath(folder, output_dir)).as_posix() if folder.is_relative_to(output_dir) \
            else str(folder)
    except ValueError:  # another drive (Windows)
        return str(folder)


def resolve_in_output(output_dir: str | Path, folder: str | Path) -> Path:
    """A folder named in a file inside ``output_dir`` as a path: relative ones under ``output_dir``; an absolute one
    that no longer exists (the output folder was moved) by its last two parts under ``output_dir``."""
    output_dir = location(output_dir)  # type: ignore[assignment]
    if isinstance(output_dir, ObjectPath) or isinstance(location(folder), ObjectPath):
        return location(folder) if "://" in str(folder) else output_dir / folder  # type: ignore[return-value]
    folder = Path(folder)
    if not folder.is_absolute():
        return output_dir / folder
    if folder.exists() or len(folder.parts) < 3:
        return folder
    moved = output_dir / folder.parent.name / folder.name
    return moved if moved.exists() else folder


def load_latest(output_dir: str | Path) -> dict[str, Any]:
    """The last run's summary, with every folder it names resolved to a path (``dir`` of each chain entry,
    ``final_dir``)."""
    output_dir = location(output_dir)  # type: ignore[assignment]
    path = output_dir / LATEST
    if not path.is_file():
        why = f"no {LATEST}" if output_dir.is_dir() else "the folder does not exist"
        raise OutputNotFound(f"{output_dir} holds no finished run ({why}); run `gmner-pipeline run synthesize "
                             f"--set run.output_dir={output_dir}` first, or give the output folder of a run")
    try:
        latest = read_json(path)
    except (OSError, ValueError) as exc:
        raise OutputNotFound(f"{path} is unreadable ({exc}); rerun the pipeline on this folder to rewrite it") from exc
    for entry in latest.get("chain") or []:
        entry["dir"] = str(resolve_in_output(output_dir, entry["dir"]))
    if latest.get("final_dir"):
        latest["final_dir"] = str(resolve_in_output(output_dir, latest["final_dir"]))
    return latest


def require_stage_dirs(output_dir: str | Path, latest: dict[str, Any], stages: list[str] | None = None) -> None:
    """Raise ``OutputNotFound`` naming every stage folder of the last run (or of ``stages``) that is missing."""
    missing = [(e["stage"], e["dir"]) for e in latest.get("chain") or []
               if (stages is None or e["stage"] in stages) and not location(e["dir"]).is_dir()]
    if missing:
        listed = "; ".join(f"{stage}: {folder}" for stage, folder in missing)
        raise OutputNotFound(f"{len(missing)} stage folder(s) of the last run in {output_dir} are missing ({listed}); "
                             "was a folder deleted or only part of the output copied? Rerun the same command to "
                             "recompute them")
