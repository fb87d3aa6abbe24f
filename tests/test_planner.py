"""The memory-budget planner over a family of variants of one tiny model: fp, RTN w4, BitStack.

The family's model is the tiny Llama with 8 layers and a 512-wide MLP (2M linear weights), so
the linears, not the embedding or BitStack's ~0.4 MiB scratch, set the sizes: BitStack's
smallest model (1 block per linear) is then smaller than RTN w4. The perplexities are TEST
FIXTURES written by this file (plausible, not measured): fp 10.0 < w4 10.4 < BitStack (10.45 at
full size, 80 at one block per linear). ~15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch
from calib_util import calib_args, write_text

from qserve.errors import BudgetError, CheckpointError, ConfigError
from qserve.model import load_model
from qserve.planner import (
    QUALITY_FILE, RUNTIME_OVERHEAD, bitstack_ppl, discover, plan, read_quality, record_quality,
    resident_weight_bytes,
)
from qserve.quant_methods.bitstack_stack import BitStackStack

CONTEXT, CONCURRENCY = 256, 2


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qserve.offline import quantizers
    from qserve.tiny import make_tiny_model

    tmp = tmp_path_factory.mktemp("family")
    fam = tmp / "tiny8"
    fp = make_tiny_model(fam / "bf16", seed=3, layers=8, intermediate=512)
    quantizers()["rtn"].run(fp, fam / "rtn-w4g128", argparse.Namespace(bits=4, group_size=128))
    args = calib_args(write_text(tmp / "calib.txt"), samples=2, seq_len=32)
    args.blocks, args.rank = 4, 4
    quantizers()["bitstack"].run(fp, fam / "bitstack", args)
    # test fixtures, not measurements
    record_quality(fam / "bf16", 10.0, 4096, 256, 256)
    record_quality(fam / "rtn-w4g128", 10.4, 4096, 256, 256)
    stack = BitStackStack(fam / "bitstack")
    record_quality(fam / "bitstack", 80.0, 4096, 256, 256, blocks=stack.min_blocks)
    record_quality(fam / "bitstack", 10.45, 4096, 256, 256, blocks=stack.total_blocks)
    return fam


def _rows(p):
    return {r.variant.name: r for r in p.rows}


def test_discover_family_and_single(family: Path) -> None:
    kinds = {v.name: v.kind for v in discover(family)}
    assert kinds == {"bf16": "fp", "rtn-w4g128": "w4", "bitstack": "bitstack"}
    assert [v.kind for v in discover(family / "rtn-w4g128")] == ["w4"]
    with pytest.raises(CheckpointError):
        discover(family / "nope")


@pytest.mark.parametrize("int8_head", [False, True])
def test_weight_bytes_match_the_loaded_model(family: Path, tiny_tied_dir: Path, int8_head: bool) -> None:
    """The planner's header arithmetic equals what the runtime really holds (the embedding table
    is a file mapping and counts for nothing; a tied head is a copy of its own)."""
    for d in (family / "bf16", family / "rtn-w4g128", tiny_tied_dir):
        model = load_model(d, torch.bfloat16, 32, int8_head=int8_head)
        assert resident_weight_bytes(d, torch.bfloat16, int8_head) == model.weight_bytes()
    stack = BitStackStack(family / "bitstack")
    n = (stack.min_blocks + stack.total_blocks) // 2
    model = stack.load_model(n, torch.bfloat16, 32, int8_head=int8_head)
    assert stack.resident_bytes(n, torch.bfloat16, int8_head) == model.weight_bytes() + stack.scratch_bytes()


def test_large_budget_picks_fp(family: Path) -> None:
    probe = plan(family, 2**40, CONTEXT, CONCURRENCY)
    budget = _rows(probe)["bf16"].total_bytes
    p = plan(family, budget, CONTEXT, CONCURRENCY)
    assert p.choice.kind == "fp" and p.choice.dir == family / "bf16" and p.choice.blocks is None
    assert p.choice.bytes == budget and p.choice.ppl == 10.0


def test_medium_budget_picks_4bit(family: Path) -> None:
    rows = _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))
    assert rows["rtn-w4g128"].total_bytes < rows["bf16"].total_bytes
    p = plan(family, rows["rtn-w4g128"].total_bytes, CONTEXT, CONCURRENCY)
    assert p.choice.kind == "w4" and p.choice.ppl == 10.4
    assert not _rows(p)["bf16"].fits and _rows(p)["bitstack"].fits  # BitStack fits, but is worse


def test_small_budget_picks_bitstack_at_largest_fitting_size(family: Path) -> None:
    stack = BitStackStack(family / "bitstack")
    rows = _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))
    fixed = rows["bitstack"].kv_bytes + rows["bitstack"].overhead_bytes
    smallest = stack.resident_bytes(stack.min_blocks, torch.bfloat16, True) + fixed
    assert smallest < rows["rtn-w4g128"].total_bytes
    budget = (smallest + rows["rtn-w4g128"].total_bytes) // 2
    p = plan(family, budget, CONTEXT, CONCURRENCY)
    c = p.choice
    assert c.kind == "bitstack" and c.dir == family / "bitstack"
    assert stack.resident_bytes(c.blocks, torch.bfloat16, True) + fixed <= budget
    assert stack.resident_bytes(c.blocks + 1, torch.bfloat16, True) + fixed > budget
    assert c.ppl == pytest.approx(bitstack_ppl(read_quality(family / "bitstack")["points"], c.blocks))
    assert 10.45 < c.ppl < 80.0
    assert "bitstack @" in p.table() and "| no |" in p.table()


def test_nothing_fits_names_smallest_viable_budget(family: Path) -> None:
    stack = BitStackStack(family / "bitstack")
    rows = _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))
    smallest = (stack.resident_bytes(stack.min_blocks, torch.bfloat16, True)
                + rows["bitstack"].kv_bytes + RUNTIME_OVERHEAD)
    with pytest.raises(BudgetError, match=f"smallest viable budget is .*{smallest} bytes"):
        plan(family, smallest - 1, CONTEXT, CONCURRENCY)
    assert plan(family, smallest, CONTEXT, CONCURRENCY).choice.blocks == stack.min_blocks


def test_kv_and_overhead_count(family: Path) -> None:
    a = _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))["bf16"]
    b = _rows(plan(family, 2**40, 2 * CONTEXT, 3 * CONCURRENCY))["bf16"]
    assert b.kv_bytes == 6 * a.kv_bytes
    cfg = discover(family / "bf16")[0].cfg
    assert a.kv_bytes == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * CONTEXT * CONCURRENCY
    assert a.overhead_bytes == RUNTIME_OVERHEAD


def test_bitstack_ppl_interpolation() -> None:
    pts = [{"blocks": 10, "ppl": 40.0}, {"blocks": 30, "ppl": 10.0}]
    assert bitstack_ppl(pts, 9) is None
    assert bitstack_ppl(pts, 10) == 40.0 and bitstack_ppl(pts, 50) == 10.0
    assert bitstack_ppl(pts, 20) == pytest.approx(20.0)  # geometric midpoint: linear in log(ppl)


def test_record_quality_and_unknown_quality(family: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        record_quality(tmp_path, float("nan"), 1, 2, 2)
    record_quality(tmp_path, 12.0, 100, 64, 64, blocks=5)
    record_quality(tmp_path, 11.0, 100, 64, 64, blocks=5)
    assert [p["ppl"] for p in read_quality(tmp_path)["points"]] == [11.0]
    # without quality files the largest fitting variant wins, and the plan says so
    bare = tmp_path / "bare"
    for v in ("bf16", "rtn-w4g128"):
        shutil.copytree(family / v, bare / v, ignore=shutil.ignore_patterns(QUALITY_FILE))
    p = plan(bare, 2**40, CONTEXT, CONCURRENCY)
    assert p.choice.kind == "fp" and p.choice.ppl is None
    assert any("no measured quality" in n for n in p.notes)


def test_cli_plan_prints_table_and_errors(family: Path, capsys: pytest.CaptureFixture) -> None:
    from qserve.cli import main

    budget = _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))["rtn-w4g128"].total_bytes
    argv = ["plan", str(family), "--memory-budget", str(budget), "--context", str(CONTEXT),
            "--concurrency", str(CONCURRENCY)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| variant | kind | weights |" in out and "choice: rtn-w4g128 (w4)" in out
    assert main(["plan", str(family), "--memory-budget", "1MiB"]) == 2
    assert "smallest viable budget" in capsys.readouterr().err


def test_plot(family: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from qserve.planner import plot

    p = plan(family, _rows(plan(family, 2**40, CONTEXT, CONCURRENCY))["rtn-w4g128"].total_bytes, CONTEXT, CONCURRENCY)
    out = plot(p, tmp_path / "plan.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
