"""The memory budget in force: plan at start, re-plan and resize while serving.

Holds the family directory and the serving settings the planner needs (context, concurrency,
dtype, head, KV format), so a budget change is one call: plan again, then have the engine serve
the new choice (BitStack blocks in place, or another variant after a drain).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qserve.errors import ConfigError
from qserve.planner import RUNTIME_OVERHEAD, Choice, Plan, plan
from qserve.sysmem import format_bytes, parse_budget, process_memory


def budget_bytes(value: str | int) -> int:
    """'auto' (a fraction of the container's memory limit or free memory), a size, or bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError("memory budget must be larger than zero")
        return value
    return parse_budget(value)


@dataclass
class BudgetController:
    family_dir: Path
    context: int
    concurrency: int
    dtype: torch.dtype
    head: str = "auto"
    kv_format: str = "model"
    overhead: int = RUNTIME_OVERHEAD  # bytes beside weights and KV (planner.serving_overhead)
    overhead_source: str = "estimate"
    budget: int = 0
    plan: Plan | None = None
    resizes: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def plan_for(self, budget: int) -> Plan:
        """The plan for `budget` (BudgetError naming the smallest viable budget when none fits)."""
        return plan(self.family_dir, budget, self.context, self.concurrency, dtype=self.dtype, head=self.head,
                    kv_format=self.kv_format, overhead=self.overhead)

    def start(self, budget: int) -> Choice:
        self.budget = budget
        self.plan = self.plan_for(budget)
        return self.plan.choice

    def resize(self, engine: Any, budget: int) -> dict[str, Any]:
        """Re-plan for `budget` and make the engine serve the new choice. Serialised."""
        with self.lock:
            t0 = time.perf_counter()
            new = self.plan_for(budget)
            result = engine.reconfigure(new.choice.dir, new.choice.blocks)
            self.budget, self.plan = budget, new
            self.resizes += 1
            took = time.perf_counter() - t0
            entry = {"budget": budget, "budget_human": format_bytes(budget), "variant": new.choice.name,
                     "blocks": new.choice.blocks, "planned_bytes": new.choice.bytes, "seconds": took, **result}
            self.history.append(entry)
            return entry

    def status(self) -> dict[str, Any]:
        c = self.plan.choice if self.plan else None
        mem = process_memory()
        return {"budget": self.budget, "budget_human": format_bytes(self.budget), "resizes": self.resizes,
                "variant": c.name if c else None, "blocks": c.blocks if c else None,
                "planned_bytes": c.bytes if c else None, "context": self.context, "concurrency": self.concurrency,
                "overhead_bytes": self.overhead, "overhead_source": self.overhead_source,
                "rss_bytes": mem.get("rss"), "peak_rss_bytes": mem.get("peak"),
                "table": self.plan.table() if self.plan else None}
