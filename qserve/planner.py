"""Memory-budget planner: the best-quality variant of a model that fits a memory budget.

Model directory layout. MODEL_DIR is either
- one checkpoint (it holds config.json): a family of one variant; or
- a family: every immediate subdirectory holding a config.json is a variant of the same model,
  e.g.
      smollm2/
        bf16/             the fp checkpoint (`qserve pull`)
        rtn-w4g128/       `qserve quantize --method rtn`
        awq-w4g64/        `qserve quantize --method awq` (awq-w3g64, sqp-w4g128, ...)
        bitstack/         `qserve quantize --method bitstack`: one stack, every size
  Directory names are free (they label the table); a variant's kind comes from its config.json:
  no quantization_config -> "fp"; qserve-woq formats -> "w4"/"w3"/"w8"; qserve-bitstack ->
  "bitstack"; any other method -> its quant_method, sized from its tensors (floats at the serving
  dtype, everything else as stored). Deeper directories are not searched.

Quality. Each variant may hold `qserve_quality.json`, written by the eval step through
`record_quality`: perplexity plus the settings it was measured with (tokens, context, stride,
text, dtype). A BitStack variant keeps one point per measured size under "points" ({"blocks",
"ppl", ...}); its perplexity at other sizes is interpolated linearly in log(ppl) between the two
nearest measured sizes; above the largest measured size the largest size's ppl is used (more
blocks only lower the error), below the smallest it is unknown. Lower ppl wins; variants of
unknown quality rank after every measured one, larger first. Compare only ppl measured with the
same settings: the plan notes when they differ.

Memory. total = weights + KV cache + runtime overhead, where
- weights: what the runtime keeps resident, computed from the checkpoint's tensor headers
  (nothing is loaded): floats at the serving dtype; W4 = packed int4 codes (padded to whole
  groups) + one bf16 (scale, offset) pair per group and row; W8 = int8 codes + a bf16 scale per
  row; BitStack = the first N blocks + the rest of the weights + its reconstruction scratch. The
  output head follows the engine: int8 (codes + bf16 row scales) for quantized checkpoints, its
  own copy when the embedding is tied. The embedding table itself is not counted: the engine
  reads its rows from a mapping of the checkpoint file (reclaimable page cache, a row per token).
  tests/test_planner.py checks these numbers against the bytes a loaded model holds.
- KV cache: the engine preallocates context x concurrency slots:
  bytes_per_token(serving dtype) x context x concurrency.
- overhead: what the process holds besides weights and KV: the interpreter, torch, the tokenizer,
  FastAPI/uvicorn, and the activations of a prefill chunk. `qserve serve` measures it: its own RSS
  once the serving stack is imported and the tokenizer loaded (serving_overhead), plus
  WORKING_OVERHEAD for what requests add. Offline (`qserve plan`) the planner uses the estimate
  RUNTIME_OVERHEAD. Both measured by bench/runtime_overhead.py; tests/test_memory.py holds a
  serving process's peak RSS to within 10% of the plan.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qserve.checkpoint import Checkpoint, TensorInfo
from qserve.config import ModelConfig, load_config
from qserve.errors import BudgetError, CheckpointError, ConfigError
from qserve.sysmem import format_bytes

QUALITY_FILE = "qserve_quality.json"
DEFAULT_CONTEXT = 2048  # the engine's default max_model_len
DEFAULT_CONCURRENCY = 8  # the engine's default max_num_seqs
# Why measured rather than fixed: the import footprint differs between machines (CI saw a server
# 88 MiB larger than this machine's for the same tiny model), so a constant cannot hold 10%.
# Measured by bench/runtime_overhead.py (torch 2.13 CPU, 4 requests filling 512-token KV slots):
# peak RSS past the serving baseline, less weights and KV, was 33 MiB for the tiny model, 15 MiB
# for SmolLM2-135M bf16 and 32 MiB for its RTN int4 g32; WORKING_OVERHEAD rounds up the largest.
WORKING_OVERHEAD = 48 * 2**20
# What compiling the decode step adds past a baseline that already has the compiler imported
# (qserve.compilation.import_compiler): graphs, generated code, codegen transients. Measured as
# peak RSS with vs without compiling, both with the compiler imported, torch 2.13: +55 MiB for
# SmolLM2-135M int4 g32, +58 MiB for the tiny model (tests/test_memory.py).
COMPILE_OVERHEAD = 64 * 2**20
# Offline estimate (no serving process to measure): a SmolLM2-135M bf16 server's peak beyond
# weights + KV on this project's dev machine.
RUNTIME_OVERHEAD = 416 * 2**20


def serving_overhead(baseline_rss: int | None = None, compiled: bool = False) -> int:
    """The overhead for a serving process whose RSS, serving stack loaded, is `baseline_rss`, and
    which compiles its decode step when `compiled`.

    Without a baseline (no /proc) the offline estimate RUNTIME_OVERHEAD.
    """
    extra = COMPILE_OVERHEAD if compiled else 0
    if not baseline_rss:
        return RUNTIME_OVERHEAD + extra
    return baseline_rss + WORKING_OVERHEAD + extra


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
EMBEDDING = "model.embed_tokens.weight"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# --- weight bytes from headers -----------------------------------------------------------------------

def int8_head_default(cfg: ModelConfig) -> bool:
    """The engine's `--head auto`: an int8 output head for quantized checkpoints."""
    return cfg.quant_method is not None


def _numel(info: TensorInfo) -> int:
    return math.prod(info.shape)


def _stored_bytes(info: TensorInfo, float_bytes: int) -> int:
    """A tensor as the runtime holds it by default: floats at the serving dtype, the rest as stored."""
    return _numel(info) * (float_bytes if info.dtype in _FLOAT_DTYPES else _DTYPE_BYTES[info.dtype])


def resident_weight_bytes(model_dir: Path, dtype: torch.dtype = torch.bfloat16, int8_head: bool | None = None) -> int:
    """Bytes the runtime keeps resident for a checkpoint's weights, from its headers.

    A quantized linear is sized by its method (QuantLinear.resident_bytes: the layout its runtime
    converts the stored tensors to); everything else as stored, floats at the serving dtype. For a
    BitStack checkpoint this counts everything but the blocks and the scratch (see
    BitStackStack.resident_bytes for a given number of blocks).
    """
    from qserve.linear import get_quant_method

    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    index = ckpt.index
    if int8_head is None:
        int8_head = int8_head_default(cfg)
    fsize = torch.empty((), dtype=dtype).element_size()
    qcfg = cfg.quantization_config or {}
    linears: dict[str, dict[str, TensorInfo]] = {
        name.rpartition(".")[0]: {} for name in index if name.endswith((".qweight", ".fp_weight"))}
    method = get_quant_method(cfg.quant_method) if linears and cfg.quant_method else None
    total = 0
    for name, info in index.items():
        base, _, leaf = name.rpartition(".")
        if ".bitstack." in name or (name == "lm_head.weight" and int8_head):
            continue  # BitStack blocks are sized by the stack; the int8 head is added below
        if name == EMBEDDING:
            # looked up from a file mapping (CausalLM.embed), held in memory as stored otherwise
            total += 0 if ckpt.mappable(name) else _numel(info) * _DTYPE_BYTES[info.dtype]
        elif base in linears:
            linears[base][leaf] = info
        else:
            total += _stored_bytes(info, fsize)
    for stored in linears.values():
        b = method.resident_bytes(stored, qcfg, fsize) if method is not None else None
        total += b if b is not None else sum(_stored_bytes(i, fsize) for i in stored.values())
    if int8_head and "lm_head.qweight" not in index:  # int8 codes + bf16 row scales
        total += cfg.vocab_size * cfg.hidden_size + 2 * cfg.vocab_size
    elif not ckpt.names("lm_head."):  # tied: the head holds its own copy of the embedding
        total += cfg.vocab_size * cfg.hidden_size * fsize
    return total


# --- variants and quality -------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    dir: Path
    kind: str  # fp | w4 | w3 | w8 | bitstack | another quant_method
    cfg: ModelConfig
    quality: dict[str, Any] | None


def variant_kind(cfg: ModelConfig) -> str:
    qc = cfg.quantization_config
    if not qc:
        return "fp"
    method = qc.get("quant_method", "?")
    if method == "qserve-bitstack":
        return "bitstack"
    if qc.get("format") == "qserve-woq-v1":
        return f"w{qc.get('bits')}"
    return method


def read_quality(variant_dir: Path) -> dict[str, Any] | None:
    path = Path(variant_dir) / QUALITY_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def discover(model_dir: Path) -> list[Variant]:
    """The variants of MODEL_DIR (a checkpoint, or a family of checkpoint subdirectories)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"model directory {root} does not exist")
    dirs = [root] if (root / "config.json").is_file() else sorted(
        d for d in root.iterdir() if d.is_dir() and (d / "config.json").is_file())
    if not dirs:
        raise CheckpointError(f"{root} holds no checkpoint (config.json) and no variant subdirectories")
    out = []
    for d in dirs:
        cfg = load_config(d)
        out.append(Variant(d.name, d, variant_kind(cfg), cfg, read_quality(d)))
    arch = {(v.cfg.architecture, v.cfg.num_layers, v.cfg.hidden_size, v.cfg.vocab_size) for v in out}
    if len(arch) > 1:
        raise ConfigError(f"the variants in {root} are not one model: {sorted(v.name for v in out)} differ in shape")
    return out


def record_quality(variant_dir: Path, ppl: float, tokens: int, context: int, stride: int, *,
                   blocks: int | None = None, text: str | None = None, dtype: str | None = None) -> Path:
    """Store a measured perplexity with the variant (BitStack: the point for `blocks` blocks).

    Called by the eval step after measuring a checkpoint; replaces an earlier record (or the
    earlier point of the same size).
    """
    if not (ppl > 0 and math.isfinite(ppl)):
        raise ConfigError(f"perplexity must be a positive finite number, got {ppl}")
    path = Path(variant_dir) / QUALITY_FILE
    data = read_quality(variant_dir) or {}
    rec = {"ppl": float(ppl), "tokens": int(tokens), "context": int(context), "stride": int(stride),
           "text": text, "dtype": dtype, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if blocks is None:
        data.update(rec)
    else:
        points = [p for p in data.get("points", []) if p.get("blocks") != blocks]
        points.append({"blocks": int(blocks), **rec})
        data["points"] = sorted(points, key=lambda p: p["blocks"])
    path.write_text(json.dumps(data, indent=2))
    return path


def bitstack_ppl(points: list[dict[str, Any]], blocks: int) -> float | None:
    """Perplexity at `blocks` from the measured points (see the module docstring)."""
    pts = sorted((p["blocks"], p["ppl"]) for p in points)
    if not pts or blocks < pts[0][0]:
        return None
    if blocks >= pts[-1][0]:
        return pts[-1][1]
    for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
        if b0 <= blocks <= b1:
            t = (blocks - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(p0) + t * math.log(p1))
    return None  # unreachable: the points bracket `blocks`


# --- the plan --------------------------------------------------------------------------------------

@dataclass
class Row:
    variant: Variant
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    ppl: float | None
    fits: bool
    int8_head: bool
    blocks: int | None = None  # BitStack: blocks of the stack this row loads

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def label(self) -> str:
        return self.variant.name + (f" @{self.blocks} blocks" if self.blocks is not None else "")


@dataclass
class Choice:
    """What to serve: the variant directory, its kind, BitStack blocks (or None), total bytes."""

    dir: Path
    kind: str
    blocks: int | None
    bytes: int
    weight_bytes: int
    ppl: float | None
    name: str


@dataclass
class Plan:
    budget: int
    context: int
    concurrency: int
    dtype: torch.dtype
    rows: list[Row]
    choice: Choice
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = ["| variant | kind | weights | KV cache | overhead | total | ppl | fits |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            ppl = "?" if r.ppl is None else f"{r.ppl:.3f}"
            lines.append(f"| {r.label} | {r.variant.kind} | {format_bytes(r.weight_bytes)} | {format_bytes(r.kv_bytes)} | "
                         f"{format_bytes(r.overhead_bytes)} | {format_bytes(r.total_bytes)} | {ppl} | "
                         f"{'yes' if r.fits else 'no'} |")
        return "\n".join(lines)


def _rank_key(r: Row) -> tuple:
    return (0, r.ppl, r.total_bytes) if r.ppl is not None else (1, -r.total_bytes, 0)


def kv_bytes(cfg: ModelConfig, context: int, concurrency: int, dtype: torch.dtype, kv_format: str = "model") -> int:
    """What the engine's cache allocates; "auto" is "cskv" for a CSKV checkpoint (its compressed
    features plus the full-precision window), else "model"."""
    from qserve.kvformats import kv_cache_bytes, kv_compression

    if kv_format == "auto":
        kv_format = "cskv" if kv_compression(cfg) else "model"
    return kv_cache_bytes(cfg, kv_format, context, concurrency, dtype=dtype)


def plan(model_dir: Path, budget_bytes: int, context: int = DEFAULT_CONTEXT, concurrency: int = DEFAULT_CONCURRENCY,
         *, dtype: torch.dtype = torch.bfloat16, head: str = "auto", kv_format: str = "model",
         overhead: int = RUNTIME_OVERHEAD) -> Plan:
    """Size every variant for this budget and choose the best-quality one that fits.

    `head` mirrors `qserve serve --head`: auto (int8 for quantized checkpoints), int8, model.
    Raises BudgetError, naming the smallest budget that would fit something, when nothing fits.
    """
    from qserve.quant_methods.bitstack_stack import BitStackStack

    if context < 1 or concurrency < 1:
        raise ConfigError(f"context and concurrency must be at least 1, got {context} and {concurrency}")
    if head not in ("auto", "int8", "model"):
        raise ConfigError(f"head must be auto, int8 or model, got {head!r}")
    rows: list[Row] = []
    notes: list[str] = []
    for v in discover(model_dir):
        int8_head = int8_head_default(v.cfg) if head == "auto" else head == "int8"
        kv = kv_bytes(v.cfg, context, concurrency, dtype, kv_format)
        q = v.quality or {}
        if v.kind == "bitstack":
            stack = BitStackStack(v.dir)
            room = budget_bytes - kv - overhead
            fits = room >= stack.resident_bytes(stack.min_blocks, dtype, int8_head)
            n = stack.blocks_for_budget(room, dtype, int8_head) if fits else stack.min_blocks
            ppl = bitstack_ppl(q.get("points", []), n)
            rows.append(Row(v, stack.resident_bytes(n, dtype, int8_head), kv, overhead, ppl, fits, int8_head, n))
        else:
            w = resident_weight_bytes(v.dir, dtype, int8_head)
            rows.append(Row(v, w, kv, overhead, q.get("ppl"), w + kv + overhead <= budget_bytes, int8_head))
        if v.quality is None or (v.kind == "bitstack" and not q.get("points")):
            notes.append(f"{v.name}: no measured quality ({QUALITY_FILE}); run the eval step on it")
    settings = {(r.get("tokens"), r.get("context"), r.get("stride"), r.get("text"))
                for v in (row.variant for row in rows) if v.quality
                for r in ([v.quality] if "ppl" in v.quality else []) + v.quality.get("points", [])}
    if len(settings) > 1:
        notes.append("perplexities were measured with different settings (tokens, context, stride, text); "
                     "compare with care")
    fitting = [r for r in rows if r.fits]
    if not fitting:
        smallest = min(rows, key=lambda r: r.total_bytes)
        raise BudgetError(
            f"no variant of {Path(model_dir).name} fits {format_bytes(budget_bytes)} with context {context} x "
            f"concurrency {concurrency}; the smallest viable budget is {format_bytes(smallest.total_bytes)} "
            f"({smallest.total_bytes} bytes: {smallest.label}; weights {format_bytes(smallest.weight_bytes)}, "
            f"KV {format_bytes(smallest.kv_bytes)}, overhead {format_bytes(smallest.overhead_bytes)})")
    best = min(fitting, key=_rank_key)
    choice = Choice(best.variant.dir, best.variant.kind, best.blocks, best.total_bytes, best.weight_bytes,
                    best.ppl, best.label)
    return Plan(budget_bytes, context, concurrency, dtype, rows, choice, notes)


def plot(p: Plan, path: Path) -> Path:
    """Perplexity vs total memory for every variant (BitStack as a curve over its measured sizes),
    with the budget line and the choice marked. Needs matplotlib (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("--plot needs matplotlib: pip install 'qserve[plot]'") from e
    from qserve.quant_methods.bitstack_stack import BitStackStack

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mib = 2**20
    for r in p.rows:
        if r.variant.kind == "bitstack":
            stack = BitStackStack(r.variant.dir)
            pts = sorted((pt["blocks"], pt["ppl"]) for pt in (r.variant.quality or {}).get("points", []))
            fixed = r.kv_bytes + r.overhead_bytes
            xs = [(stack.resident_bytes(b, p.dtype, r.int8_head) + fixed) / mib for b, _ in pts]
            ax.plot(xs, [ppl for _, ppl in pts], "o-", label=f"{r.variant.name} (BitStack)")
        elif r.ppl is not None:
            ax.plot([r.total_bytes / mib], [r.ppl], "s", zorder=3, label=f"{r.variant.name} ({r.variant.kind})")
    if p.choice.ppl is not None:
        ax.plot([p.choice.bytes / mib], [p.choice.ppl], "*", markersize=18, color="gold", markeredgecolor="k",
                zorder=2, label=f"choice: {p.choice.name}")
    ax.axvline(p.budget / mib, color="red", linestyle="--", label=f"budget {format_bytes(p.budget)}")
    ax.set_xlabel(f"memory (MiB): weights + KV ({p.context} x {p.concurrency}) + overhead")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
