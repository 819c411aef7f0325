"""Seeded, version-proof variation shared by every style: chain seeds, request seeds, the order of the triples and the
order of the fields inside a triple.

All draws come from sha256 of (seed, counter) rather than ``random.Random`` or Python's ``hash()`` (salted per
process), so a chain, a request's seed and every order are identical across runs, worker processes, machines and
Python versions; tests pin the values.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

FIELDS = ("entity", "type", "location")
REQUEST_SEED_BITS = 31  # llama.cpp's server reads the seed as a 32-bit integer; vLLM and OpenAI take any int


def chain_seed(run_seed: int, seed_offset: int, record_id: str, route: str, index: int) -> int:
    """A 63-bit seed for one chain (or one request: ``route`` then names style, teacher and route), stable across
    runs, processes, machines and Python versions."""
    payload = f"{run_seed}\x1f{seed_offset}\x1f{record_id}\x1f{route}\x1f{index}".encode()
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") >> 1


def request_seed(seed: int, attempt: int = 0) -> int:
    """The ``seed`` sent with a teacher request: the chain seed folded to 31 bits, one per attempt."""
    return (seed + attempt * 0x9E3779B1) % (1 << REQUEST_SEED_BITS)


class Draw:
    """Deterministic draws from a seed. Built on sha256 of (seed, counter) rather than ``random.Random`` so that the
    sequence cannot change with the Python version."""

    def __init__(self, seed: int):
        self.seed = seed
        self._counter = 0

    def below(self, n: int) -> int:
        if n <= 0:
            raise ValueError("below(n) needs n >= 1")
        self._counter += 1
        digest = hashlib.sha256(f"{self.seed}:{self._counter}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % n  # modulo bias < n / 2**64: irrelevant here

    def pick(self, options: Sequence[str]) -> str:
        return options[self.below(len(options))]

    def shuffled(self, items: Sequence[Any]) -> list[Any]:
        out = list(items)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


def orders(draw: Draw, n_triples: int, vary_triple_order: bool, vary_field_order: bool
           ) -> tuple[list[int], list[str]]:
    """The order of the triples (a permutation of ``range(n_triples)``) and of the fields inside a triple, drawn in
    that order from ``draw`` (the template style relies on the sequence: its pinned chains depend on it)."""
    order = draw.shuffled(range(n_triples)) if vary_triple_order else list(range(n_triples))
    fields = draw.shuffled(FIELDS) if vary_field_order else list(FIELDS)
    return order, fields
