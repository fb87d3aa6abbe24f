"""Budget parsing and the `auto` budget read from fake /proc and cgroup trees (no real limits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qserve.errors import BudgetError, ConfigError
from qserve.sysmem import (
    DEFAULT_RESERVE,
    auto_budget,
    available_memory,
    format_bytes,
    parse_budget,
    process_memory,
)

GiB = 2**30
MiB = 2**20
V1_UNLIMITED = "9223372036854771712"


def _write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def _meminfo(root: Path, avail_bytes: int) -> None:
    _write(root, "proc/meminfo", f"MemTotal: 99999999 kB\nMemAvailable: {avail_bytes // 1024} kB\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3GiB", 3 * GiB),
        ("3gib", 3 * GiB),
        ("3Gi", 3 * GiB),
        ("512MiB", 512 * MiB),
        ("2.5GB", 2_500_000_000),
        ("2G", 2_000_000_000),
        ("1.5KiB", 1536),
        (" 1234 ", 1234),
        ("1234B", 1234),
        ("1Ti", 2**40),
    ],
)
def test_parse_budget_sizes(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "3 GiBs", "-1GiB", "1.2.3G", "3XB", "0", "0.0GiB"])
def test_parse_budget_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_budget(text)


def test_parse_budget_auto_uses_root(tmp_path: Path) -> None:
    _meminfo(tmp_path, 8 * GiB)
    assert parse_budget("AUTO", root=tmp_path) == auto_budget(root=tmp_path)


def test_meminfo_only(tmp_path: Path) -> None:
    _meminfo(tmp_path, 8 * GiB)
    avail = available_memory(tmp_path)
    assert avail.bytes == 8 * GiB
    assert "MemAvailable" in avail.source
    assert auto_budget(0.5, root=tmp_path) == 4 * GiB - DEFAULT_RESERVE
    assert auto_budget(1.0, root=tmp_path, reserve=0) == 8 * GiB


def test_cgroup_v2_limit_less_working_set(tmp_path: Path) -> None:
    """Container view (cgroup namespace): 0::/ and the limit at the mount root."""
    _meminfo(tmp_path, 64 * GiB)
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", f"{4 * GiB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory.current", f"{1 * GiB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory.stat", f"anon 123\ninactive_file {512 * MiB}\nfile 9\n")
    avail = available_memory(tmp_path)
    assert avail.bytes == 4 * GiB - (1 * GiB - 512 * MiB)
    assert "cgroup v2" in avail.source
    assert auto_budget(0.9, root=tmp_path) == int(avail.bytes * 0.9) - DEFAULT_RESERVE


def test_cgroup_v2_max_is_unlimited(tmp_path: Path) -> None:
    _meminfo(tmp_path, 3 * GiB)
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", "max\n")
    _write(tmp_path, "sys/fs/cgroup/memory.current", f"{1 * GiB}\n")
    assert available_memory(tmp_path).bytes == 3 * GiB


def test_cgroup_v2_parent_limit_binds(tmp_path: Path) -> None:
    """Host view: the process's own cgroup is unlimited but its parent slice is not."""
    _meminfo(tmp_path, 64 * GiB)
    _write(tmp_path, "proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
    _write(tmp_path, "sys/fs/cgroup/kubepods/pod1/ctr/memory.max", "max\n")
    _write(tmp_path, "sys/fs/cgroup/kubepods/pod1/memory.max", f"{2 * GiB}\n")
    _write(tmp_path, "sys/fs/cgroup/kubepods/pod1/memory.current", f"{256 * MiB}\n")
    assert available_memory(tmp_path).bytes == 2 * GiB - 256 * MiB


def test_cgroup_v1_container_mount_is_own_cgroup(tmp_path: Path) -> None:
    """v1 without cgroup namespace: /proc/self/cgroup names a host path absent in the mount."""
    _meminfo(tmp_path, 64 * GiB)
    _write(tmp_path, "proc/self/cgroup", "4:memory:/machine.slice/libpod-abc\n0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", f"{3 * GiB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory/memory.usage_in_bytes", f"{600 * MiB}\n")
    _write(
        tmp_path,
        "sys/fs/cgroup/memory/memory.stat",
        f"cache 1\ninactive_file 999999999\ntotal_inactive_file {100 * MiB}\n",
    )
    avail = available_memory(tmp_path)
    assert avail.bytes == 3 * GiB - 500 * MiB
    assert "cgroup v1" in avail.source


def test_cgroup_v1_huge_limit_is_unlimited(tmp_path: Path) -> None:
    _meminfo(tmp_path, 5 * GiB)
    _write(tmp_path, "proc/self/cgroup", "4:memory:/user.slice\n")
    _write(tmp_path, "sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes", V1_UNLIMITED)
    _write(tmp_path, "sys/fs/cgroup/memory/memory.limit_in_bytes", V1_UNLIMITED)
    assert available_memory(tmp_path).bytes == 5 * GiB


def test_host_memory_caps_a_loose_limit(tmp_path: Path) -> None:
    _meminfo(tmp_path, 1 * GiB)
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", f"{16 * GiB}\n")
    assert available_memory(tmp_path).bytes == 1 * GiB


def test_limit_with_no_room_is_a_budget_error(tmp_path: Path) -> None:
    _meminfo(tmp_path, 64 * GiB)
    _write(tmp_path, "proc/self/cgroup", "0::/\n")
    _write(tmp_path, "sys/fs/cgroup/memory.max", f"{512 * MiB}\n")
    _write(tmp_path, "sys/fs/cgroup/memory.current", f"{400 * MiB}\n")
    with pytest.raises(BudgetError, match="container memory limit"):
        auto_budget(root=tmp_path)


def test_nothing_readable_is_a_budget_error(tmp_path: Path) -> None:
    with pytest.raises(BudgetError, match="--memory-budget"):
        auto_budget(root=tmp_path)


def test_bad_fraction(tmp_path: Path) -> None:
    _meminfo(tmp_path, 8 * GiB)
    with pytest.raises(ConfigError):
        auto_budget(1.5, root=tmp_path)


def test_real_machine_gives_a_positive_budget() -> None:
    assert auto_budget(reserve=0) > 0


def test_format_bytes() -> None:
    assert format_bytes(3 * GiB) == "3.00 GiB"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(12) == "12 B"


def test_process_memory_reads_proc_status(tmp_path: Path) -> None:
    (tmp_path / "proc/42").mkdir(parents=True)
    (tmp_path / "proc/42/status").write_text("Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n")
    assert process_memory(42, root=tmp_path) == {"rss": 1024 * 1024, "peak": 2048 * 1024}
    assert process_memory(43, root=tmp_path) == {}


def test_process_memory_of_this_process() -> None:
    mem = process_memory()
    assert 0 < mem["rss"] <= mem["peak"]
