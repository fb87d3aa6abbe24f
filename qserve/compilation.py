"""torch.compile for the embedded engine's decode step: when it applies, and its warm-up.

Why: at batch 1 a small model's decode step is dominated by eager dispatch, not by the matmuls
(SmolLM2-135M int4: ~1000 ops per token, the int4 matmuls ~40% of the time). Inductor fuses each
layer's norms, RoPE, cache write, attention and SiLU glue into a few C++ kernels around the
int4/int8/bf16 matmuls, which stay torch's own kernels.

What is compiled is a step through a few consecutive layers (`model.decode_layers` over
`DecoderLayer.decode_dense`) that every group of layers reuses: the layers are the same code on
different tensors, so one graph serves all groups and compiling costs a group, not the model.
Grouping amortises dynamo's per-call cost (guards, wrapper): SmolLM2-135M int4 g32 batch 1,
one loop, median tok/s: 1 layer per call 133-147, 3 layers 149-153, 5 layers 155-157, 10 layers
155-165, at a compile time that grows with the group (one graph, cold: 12 s at 1, 8 s at 5,
14 s at 10 layers). Two graphs for the layers: batch 1, and any batch of 2 or more; the key
length is dynamic in both. The final norm and head are a graph of their own (`decode_head`), one
per batch-size range (_warm_up). All are compiled before the engine takes requests, so no request
pays a compile. Prefill stays eager (its matmuls dominate), except its last row's head, which runs
the compiled head (CausalLM.forward).

Larger groups for the batch graph alone were measured and not taken: 15 layers a call ran 1.056x
as fast as 6 at 8 rows (SmolLM2-135M int4 g32, 16 paired rounds, min 0.95), but raised the
server's peak RSS by 53 MiB past the planner's COMPILE_OVERHEAD (bench/runtime_overhead.py: peak /
plan 1.01 -> 1.09) and doubled the cold compile (~30 -> 58 s).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from types import FunctionType

import torch
from torch import nn

from qserve.attention import sdpa_attention
from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.linear import ROW_GROUP
from qserve.model import CausalLM, decode_head, decode_layers

log = logging.getLogger("qserve.compile")

MODES = ("auto", "on", "off")
# No size/stride asserts on every input in the generated wrapper (~130 per call at 6 layers a call,
# with the buffer allocations the Python left between the kernels): dynamo's guards check the
# inputs already, and layer_signature the parameters whose guards _guard_options skips.
# SmolLM2-135M bf16 batch 1: +2.5% and +3.9% tok/s, paired in-process runs of 20 and 12 rounds.
# Fused multiply-adds: inductor compiles its C++ with -ffp-contract=off by default, so every
# multiply-accumulate in its loops (the tiled head's row sums, attention's q.k and P.V) is a
# multiply and a separate add. Contracted, the int8 head at 8 rows took 3.9 against 4.9 ms (2.6
# against 3.0 at 4 rows); SmolLM2-135M int4 g32's compiled step, paired in-process rounds, ran
# 1.033x and 1.047x as fast at batch 8 (30 and 16 rounds), 1.00x and 1.02x at batch 1. An FMA
# rounds once where the pair rounds twice: fp32 sums move in their last bits.
INDUCTOR_OPTIONS = {"size_asserts": False, "cpp.enable_floating_point_contract_flag": "fast"}


def compile_problem(model: CausalLM, cache: KVCache) -> str | None:
    """Why the compiled decode step cannot serve this model and cache, or None when it can."""
    if type(cache) is not KVCache:
        return f"the KV cache format {cache.kv_format!r} has its own write/read (only the dense cache is compiled)"
    if model.attention is not sdpa_attention:
        return "a non-default attention implementation is selected"
    if not all(layer.dense_decode_ok for layer in model.layers):
        return "the checkpoint compresses KV, rotates q/k, or uses a linear not declared compile-safe"
    return toolchain_problem()


def toolchain_problem() -> str | None:
    """Why inductor cannot build kernels here (it generates C++ on CPU), or None."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not on PATH): inductor generates C++ on CPU"
    return None


def will_try_compile(mode: str) -> bool:
    """Whether a decode step in `mode` will be compiled, unless the model or KV format turn out
    not to allow it (compile_problem)."""
    return mode != "off" and toolchain_problem() is None


def import_compiler() -> None:
    """Import the compiler stack now (~115 MiB of RSS), e.g. before the planner measures the
    serving baseline, so that a process which will compile is measured with it."""
    import torch._inductor.compile_fx  # noqa: F401


def group_size(num_layers: int, largest: int = 6) -> int:
    """Layers per compiled call: the largest divisor of num_layers up to `largest`, so every call
    has the same shape (one graph) and none is a remainder."""
    return max(k for k in range(1, largest + 1) if num_layers % k == 0)


def setup_compiled_decode(mode: str, model: CausalLM, cache: KVCache, max_num_seqs: int, bucket: int) -> str:
    """Compile and warm up the decode step per `mode` (auto: when it applies; on: or fail; off).

    Returns a one-line status for logs and /admin info. In `auto`, a model it does not apply to or
    a failing compiler leaves the eager path in place (the engine works either way)."""
    model.compiled_step, model.compiled_head = None, decode_head
    if mode not in MODES:
        raise ConfigError(f"compile mode must be one of {MODES}, got {mode!r}")
    if mode == "off":
        return "off"
    problem = compile_problem(model, cache)
    if problem is not None:
        if mode == "on":
            raise ConfigError(f"--compile on, but the decode step cannot be compiled: {problem}")
        log.info("decode runs eager: %s", problem)
        return f"off ({problem})"
    t0 = time.perf_counter()
    n = group_size(len(model.layers))
    model.step_groups = [tuple(model.layers[i:i + n]) for i in range(0, len(model.layers), n)]
    model.compiled_step = torch.compile(_own_code(decode_layers), options=INDUCTOR_OPTIONS | _guard_options(model))
    model.compiled_head = torch.compile(_own_code(decode_head), options=INDUCTOR_OPTIONS)
    try:
        _warm_up(model, cache, max_num_seqs, bucket)
    except Exception as e:  # a broken toolchain must not take a server down in auto
        model.compiled_step, model.compiled_head = None, decode_head
        if mode == "on":
            raise ConfigError(f"--compile on, but compiling the decode step failed: {type(e).__name__}: {e}") from e
        log.warning("compiling the decode step failed, decode runs eager: %s: %s", type(e).__name__, e)
        return f"off (compile failed: {type(e).__name__})"
    took = time.perf_counter() - t0
    log.info("decode step compiled in %.1f s (%d layers per call)", took, n)
    return f"on (compiled in {took:.1f} s)"


_COPIES = itertools.count()  # numbers each _own_code copy's name


def _own_code(fn: FunctionType) -> FunctionType:
    """fn with a code object, and a name, of its own. Why: dynamo caches graphs on the code object,
    so every model compiled in a process would share one cache, and a graph traced for another model
    (whose module guards _guard_options skipped) would run on this one. It also keeps what it learnt
    about input shapes (automatic dynamic) per file, line and name: after a model with another cache
    size, a copy of the same name compiled its graphs with dynamic cache shapes whose guards then
    failed while serving (a recompile), so each copy is named apart."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_COPIES)}")
    return FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def layer_signature(layer: nn.Module) -> tuple:
    """What a graph traced through one layer assumes of another: module types, plain attributes
    (ints, flags, tuples; not the layer index) and the metadata of every tensor it holds."""
    def meta(t: torch.Tensor) -> tuple:
        return t.dtype, tuple(t.shape), t.is_mkldnn, None if t.is_mkldnn else t.stride()

    out: list[tuple] = []
    for name, m in layer.named_modules():
        state = {**vars(m), **m._parameters, **m._buffers}
        out.append((name, type(m), tuple(sorted(
            (k, meta(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in state.items()
            if not k.startswith("_") and k != "idx" and isinstance(v, (torch.Tensor, int, float, bool, str, tuple))))))
    return tuple(out)


def _guard_options(model: CausalLM) -> dict:
    """Skip dynamo's guards on the layer modules when every layer has the same signature.

    Why: the guards re-check each parameter of the group's layers on every call, ~110 us per call
    (SmolLM2-135M int4 g32: 5 calls per token, ~0.5 ms of a 6.5 ms step; decode 140-150 -> 164-170
    tok/s without them, two runs each). They protect a graph from a module it was not traced for;
    identical signatures are that check done once, here. Layers that differ keep full guards."""
    if len({layer_signature(layer) for layer in model.layers}) != 1:
        log.info("decode layers differ in structure: the compiled step keeps dynamo's module guards")
        return {}
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def _warm_up(model: CausalLM, cache: KVCache, max_num_seqs: int, bucket: int) -> None:
    """Compile the graphs on the first slots at position 0 of an empty cache, then clear what they wrote.

    Batch sizes 1, 2 and ROW_GROUP + 1: a tiled int8 head reads rows in groups of ROW_GROUP
    (qserve.linear.gemm_tiled), and its graph for one group (2..ROW_GROUP rows) cannot serve
    several, so the head gets a graph for each; the layers' batch graph serves all sizes above 1.
    Batch tensors are made outside inference mode, as the engine makes them: the graphs guard on it."""
    sizes = sorted({min(b, max_num_seqs) for b in (1, 2, ROW_GROUP + 1)})
    for b in sizes:
        batch = Batch.make(list(range(b)), [0] * b, 1, bucket=bucket, max_len=cache.max_len)
        model.decode(torch.zeros(b, 1, dtype=torch.long), batch, cache)
    with torch.no_grad():
        cache.k[:, :sizes[-1], :, 0].zero_()
        cache.v[:, :sizes[-1], :, 0].zero_()
