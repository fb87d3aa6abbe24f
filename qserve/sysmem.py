"""How much memory qserve may use: parse user budgets, and derive `auto` from the container limit.

Why the cgroup: inside a container /proc/meminfo shows the host's memory, not the pod's limit;
a model sized to the host gets the process OOM-killed. The cgroup limit (v2 `memory.max`, v1
`memory.limit_in_bytes`) is the real ceiling, so `auto` takes the room left under it, and never
more than the host's MemAvailable. Every reader takes a `root` so tests can point it at fake files.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import BudgetError, ConfigError

# Kubernetes quantity convention, so chart values read the same here: K/M/G/T are powers of
# 1000, Ki/Mi/Gi/Ti powers of 1024; a trailing "B" is allowed ("2.5GB", "3GiB").
_UNITS = {
    "": 1,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)

# cgroup v1 reports "no limit" as a page-rounded 2**63-1; anything this large means unlimited.
_UNLIMITED = 2**60
# Kept back from `auto` for what the budget does not plan: activations, tokenizer, HTTP buffers.
DEFAULT_RESERVE = 256 * 2**20


@dataclass(frozen=True)
class Available:
    """Bytes the process could still allocate, and where that number came from (for logs)."""

    bytes: int
    source: str


def parse_budget(text: str, *, root: str | Path = "/") -> int:
    """Bytes for a `--memory-budget` value: "auto", "3GiB", "512Mi", "2.5GB" or plain bytes."""
    if text.strip().lower() == "auto":
        return auto_budget(root=root)
    m = _BUDGET_RE.match(text)
    if not m:
        raise ConfigError(
            f"invalid memory budget {text!r}: use 'auto', bytes, or a size like 3GiB, 512MiB, 2.5GB"
        )
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise ConfigError(f"memory budget {text!r} must be larger than zero")
    return value


def process_memory(pid: int | str = "self", *, root: str | Path = "/") -> dict[str, int]:
    """Resident set size now ("rss") and at its peak ("peak") in bytes, from /proc/PID/status.

    Empty where /proc has no such file (not Linux): callers fall back to estimates.
    """
    keys = {"VmRSS": "rss", "VmHWM": "peak"}
    try:
        lines = (Path(root) / f"proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in keys:
            out[keys[key]] = int(value.split()[0]) * 1024
    return out


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere.

    Why: glibc keeps the temporaries of loading a model (hundreds of MiB for a quantized one)
    in its arenas, so RSS stays above what the planner budgets until something trims them.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def format_bytes(n: int) -> str:
    """Human-readable binary size for messages, e.g. 3221225472 -> '3.00 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def auto_budget(
    fraction: float = 0.9, *, root: str | Path = "/", reserve: int = DEFAULT_RESERVE
) -> int:
    """The `auto` budget: `fraction` of the memory still available, less a fixed `reserve`."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"memory fraction must be in (0, 1], got {fraction}")
    avail = available_memory(root)
    budget = int(avail.bytes * fraction) - reserve
    if budget <= 0:
        raise BudgetError(
            f"no memory left for a model: {format_bytes(avail.bytes)} available ({avail.source}), "
            f"{format_bytes(reserve)} reserved; raise the container memory limit"
        )
    return budget


def available_memory(root: str | Path = "/") -> Available:
    """Room left under the tightest cgroup limit, capped by the host's MemAvailable."""
    root = Path(root)
    host = _meminfo_available(root)
    limited = _cgroup_available(root)
    if limited is not None and (host is None or limited.bytes < host):
        return limited
    if host is not None:
        return Available(host, "/proc/meminfo MemAvailable")
    raise BudgetError(
        "cannot tell how much memory is available (no cgroup limit, no /proc/meminfo); "
        "pass --memory-budget explicitly"
    )


def _meminfo_available(root: Path) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_available(root: Path) -> Available | None:
    """Smallest (limit - working set) over this process's memory cgroup and its ancestors.

    Parents count because their limits bind too. The working set is usage less inactive file
    cache (what the kernel reclaims before OOM-killing), as the kubelet computes it.
    """
    best: Available | None = None
    for version, base, rel in _cgroup_dirs(root):
        for d in _ancestors(base, rel):
            if version == 2:
                limit, usage, inactive = (
                    _read_int(d / "memory.max"), _read_int(d / "memory.current"), "inactive_file"
                )
            else:
                limit, usage, inactive = (
                    _read_int(d / "memory.limit_in_bytes"),
                    _read_int(d / "memory.usage_in_bytes"),
                    "total_inactive_file",
                )
            if limit is None or limit >= _UNLIMITED:
                continue
            working = max(0, (usage or 0) - _stat_value(d / "memory.stat", inactive))
            room = max(0, limit - working)
            if best is None or room < best.bytes:
                best = Available(
                    room,
                    f"cgroup v{version} {d.relative_to(root)}: limit {format_bytes(limit)}, "
                    f"in use {format_bytes(working)}",
                )
    return best


def _cgroup_dirs(root: Path) -> list[tuple[int, Path, str]]:
    """(version, mount dir, this process's cgroup path) for the memory controller, v2 and v1."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    v2_path, v1_path = "/", "/"
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
        elif "memory" in parts[1].split(","):
            v1_path = parts[2]
    fs = root / "sys/fs/cgroup"
    return [(2, fs, v2_path), (1, fs / "memory", v1_path)]


def _ancestors(base: Path, rel: str) -> list[Path]:
    """The cgroup's directory and its parents up to the mount, deepest first.

    In a container without a cgroup namespace (usual for v1) /proc/self/cgroup names the host's
    path, while the mount already is the container's own cgroup: then only the mount is read.
    """
    own = base / rel.strip("/")
    if not own.is_dir():
        return [base] if base.is_dir() else []
    dirs = [own]
    while dirs[-1] != base:
        dirs.append(dirs[-1].parent)
    return dirs


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
