"""llama-bench's unit: a ``Cell`` (which of the seed report's four techniques are on), the seed's 16 ``CELLS`` in
its order, and what every record of a cell carries: its identifying fields and its peak split into ``BREAKDOWN``'s
categories."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# MemTracker's categories; "other" also takes its "buffer" (none in this model) and holds what no module owns,
# e.g. the batches of tokens.
BREAKDOWN = ("parameter", "gradient", "optimizer state", "activation", "temporary", "other")


@dataclass(frozen=True)
class Cell:
    """One cell of the seed's table: which of the four techniques are on."""
    ga: bool
    gc: bool
    mp: bool
    lora: bool

    @property
    def name(self) -> str:
        on = [n for n, v in (("GA", self.ga), ("GC", self.gc), ("MP", self.mp), ("LoRA", self.lora)) if v]
        return "+".join(on) or "plain"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        """The cell a name such as ``plain``, ``LoRA`` or ``GC+MP+LoRA`` names (any case, any order); ValueError
        naming an unknown one."""
        parts = {p.strip().upper() for p in name.split("+") if p.strip()}
        if parts == {"PLAIN"}:
            parts = set()
        unknown = parts - {"GA", "GC", "MP", "LORA"}
        if unknown or not name.strip():
            raise ValueError(f"unknown cell {name!r}: write e.g. plain, LoRA, GC+MP+LoRA, GA+GC+MP+LoRA")
        return cls("GA" in parts, "GC" in parts, "MP" in parts, "LORA" in parts)

    def record_fields(self) -> dict[str, Any]:
        """The fields that open every record of this cell: its name and its four switches."""
        return {"cell": self.name, "ga": self.ga, "gc": self.gc, "mp": self.mp, "lora": self.lora}


# The seed's order: the table with GA, then without; GC off/on, then MP off/on, then LoRA off/on.
CELLS = tuple(Cell(ga, gc, mp, lora) for ga in (True, False) for gc in (False, True) for mp in (False, True)
              for lora in (False, True))


def breakdown(mb: dict[str, float]) -> dict[str, float]:
    """A MemTracker split (MiB by ``llama_ref.perf.peak.CATEGORIES``) in ``BREAKDOWN``'s categories, every one
    present: the buffers counted in "other"."""
    picked = {k: mb.get(k, 0.0) for k in BREAKDOWN}
    picked["other"] += mb.get("buffer", 0.0)
    return picked
