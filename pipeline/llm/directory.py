"""Where a role's replicas are now: the client reads it when an endpoint stops answering (``RoleConfig.directory``).

* ``ray:<actor>/<role>``: the ``ReplicaDirectory`` actor of the run's managed replicas (``replicas.lookup``; only
  inside Ray, where the stage workers run);
* ``file:<path>``: a JSON list of base URLs, or ``{"endpoints": [...]}``, one per endpoint of the role, in order
  (``null`` for one that is down): for servers some other tool restarts.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_directory(address: str) -> list[str | None]:
    """The current base URL of each of the role's endpoints (None: that one is down, keep what you have)."""
    scheme, _, rest = address.partition(":")
    if scheme == "ray":
        from .replicas import lookup  # imports Ray; only roles whose replicas the pipeline manages get here

        urls = lookup(rest)
    elif scheme == "file":
        data = json.loads(Path(rest).read_text(encoding="utf-8"))
        urls = data.get("endpoints") if isinstance(data, dict) else data
    else:
        raise ValueError(f"unknown replica directory {address!r}: use ray:<actor>/<role> or file:<path>")
    if not isinstance(urls, list):
        raise ValueError(f"replica directory {address!r} holds no list of URLs")
    return [u.rstrip("/") if isinstance(u, str) and u else None for u in urls]
