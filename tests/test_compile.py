"""The compiled decode step (qserve.compilation): what it applies to, that it does not recompile
while serving, and that it computes what the eager step computes. Greedy equality with
transformers and with solo runs, compiled, is in test_engine.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_util import make_engine, needs_compiler, run_many, tokens
from qserve.compilation import INDUCTOR_OPTIONS, setup_compiled_decode
from qserve.engine_api import SamplingParams
from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.engine import TorchEngine
from qserve.linear import DenseLinear, can_pack
from qserve.model import load_model

pytestmark = needs_compiler


def test_no_recompile_across_batch_sizes_and_key_lengths(tiny_dir: Path) -> None:
    """After the start-up warm-up, batch sizes 1..5 and key lengths across three 64-token
    buckets run on the two warmed graphs: dynamo compiles no new graph while serving."""
    from torch._dynamo.utils import counters

    eng = make_engine(tiny_dir, dtype="float32", max_num_seqs=5, max_model_len=256, compile="on")
    try:
        graphs = counters["stats"]["unique_graphs"]
        ids = eng.tokenizer("The quick brown fox")["input_ids"]
        params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        for n in (1, 2, 5):
            for evs in run_many(eng, [ids] * n, params):
                assert evs[-1].finish_reason == "length" and len(tokens(evs)) == 150
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        eng.shutdown()


def test_compiled_step_matches_eager_in_bf16(tiny_rtn4_dir: Path) -> None:
    """int4 weights, bf16 activations: the compiled step fuses ops the eager step rounds to bf16
    between, so logits agree to bf16 precision (2% of their scale), not bit for bit. Rows of a
    batch at different positions and slots, one not in slot order."""
    model = load_model(tiny_rtn4_dir, torch.bfloat16, 128, int8_head=True)
    cfg = model.cfg
    caches = [KVCache(cfg.num_layers, 4, 128, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16) for _ in range(2)]
    assert setup_compiled_decode("on", model, caches[1], 4, 64).startswith("on")  # warms up on an empty cache
    prompts = {0: list(range(5, 25)), 2: list(range(40, 47)), 3: list(range(60, 90))}
    for cache in caches:
        for slot, p in prompts.items():
            model(torch.tensor([p]), Batch.make([slot], [0], len(p)), cache)
    slots = [3, 0, 2]
    batch = Batch.make(slots, [len(prompts[s]) for s in slots], 1, bucket=64, max_len=128)
    ids = torch.tensor([[7], [8], [9]])
    want = model(ids, batch, caches[0])
    got = model.decode(ids, batch, caches[1])
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())
    torch.testing.assert_close(caches[1].k, caches[0].k, rtol=0, atol=0.02 * caches[0].k.abs().max().item())


def test_what_it_applies_to(tiny_dir: Path) -> None:
    """A KV format with its own write/read keeps the eager step: auto says why, on refuses."""
    eng = make_engine(tiny_dir, kv_format="int8", compile="auto")
    try:
        assert eng.compile_status.startswith("off (") and "int8" in eng.compile_status
        evs = run_many(eng, [[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
        assert len(tokens(evs)) == 4
    finally:
        eng.shutdown()
    with pytest.raises(ConfigError, match="cannot be compiled"):
        make_engine(tiny_dir, kv_format="int8", compile="on")
    with pytest.raises(ConfigError, match="compile mode"):
        make_engine(tiny_dir, compile="sometimes")


@pytest.mark.skipif(not can_pack(torch.bfloat16), reason="oneDNN without native bf16 on this CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_dense_linears(tiny_tied_dir: Path, dtype: torch.dtype) -> None:
    """oneDNN-packed weights (the engine's layout for unquantized linears) compute what the plain
    ones do, eager and compiled, and hold the same bytes; a head tied to the embedding is packed too
    (it has its own copy: the embedding is read from the file mapping)."""
    plain = load_model(tiny_tied_dir, dtype, 64)
    packed = load_model(tiny_tied_dir, dtype, 64)
    n = packed.pack_dense_linears()
    assert n == 4 * plain.cfg.num_layers + 1  # qkv, o, gate_up, down, and the tied head
    assert packed.pack_dense_linears() == 0  # packed ones are left as they are
    assert packed.tied_head and packed.lm_head.packed and not plain.lm_head.packed
    assert packed.layers[0].qkv.weight.is_mkldnn and packed.weight_bytes() == plain.weight_bytes()
    cfg = plain.cfg
    x = torch.randn(3, 5, cfg.hidden_size).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in ((plain.layers[1].gate_up, packed.layers[1].gate_up), (plain.layers[0].down, packed.layers[0].down)):
        xa = x if a.in_features == cfg.hidden_size else torch.randn(3, 5, a.in_features).to(dtype)
        want = a(xa).float()
        torch.testing.assert_close(b(xa).float(), want, rtol=0, atol=tol * want.abs().max().item())
    caches = [KVCache(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim, dtype) for _ in range(2)]
    assert setup_compiled_decode("on", packed, caches[1], 2, 64).startswith("on")
    ids = torch.tensor([list(range(3, 15))])
    plain(ids, Batch.make([0], [0], 12), caches[0])
    packed(ids, Batch.make([0], [0], 12), caches[1])
    batch = Batch.make([0], [12], 1, bucket=64, max_len=64)
    want = plain(torch.tensor([[5]]), batch, caches[0])
    got = packed.decode(torch.tensor([[5]]), batch, caches[1])
    torch.testing.assert_close(got, want, rtol=0, atol=tol * 2 * want.abs().max().item())


def test_swapping_variants_recompiles_for_the_new_one(tiny_dir: Path, tiny_rtn4_dir: Path) -> None:
    """A budget change that swaps checkpoints (fp -> int4 -> fp) drains, reloads, drops the old
    graphs and compiles for the new model: outputs then equal a fresh engine's on that variant
    (compiled too: the int4 model's int8 head is tiled only when the step compiles, and its sums
    round to bf16 logits in another order than the eager kernel's, which flips ties on this tiny
    random model)."""
    from torch._dynamo.utils import counters

    eng = make_engine(tiny_dir, dtype="float32", max_num_seqs=2, compile="on")
    ids = eng.tokenizer("The quick brown fox")["input_ids"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    try:
        for target in (tiny_rtn4_dir, tiny_dir):
            assert eng.reconfigure(target, None)["mode"] == "reloaded after draining"
            assert eng.compile_status.startswith("on") and eng.info().quant_method == (
                "none" if target == tiny_dir else "qserve-rtn")
            graphs = counters["stats"]["unique_graphs"]
            got = [tokens(evs) for evs in run_many(eng, [ids, ids[:3]], params)]
            assert counters["stats"]["unique_graphs"] == graphs  # warmed up by the swap itself
            ref = make_engine(target, dtype="float32", max_num_seqs=2, compile="on")
            try:
                assert got == [tokens(evs) for evs in run_many(ref, [ids, ids[:3]], params)]
            finally:
                ref.shutdown()
    finally:
        eng.shutdown()


def test_a_failing_compiled_step_hands_over_to_eager(tiny_dir: Path) -> None:
    """If the compiled step ever raises while serving, the same step is redone eagerly and the
    engine stays eager: requests complete with the eager engine's tokens, none fails."""
    eng = make_engine(tiny_dir, dtype="float32", max_num_seqs=2, compile="on")
    ref = make_engine(tiny_dir, dtype="float32", max_num_seqs=2)
    try:
        calls = []

        def broken(*args):
            calls.append(1)
            raise RuntimeError("simulated kernel failure")

        eng.model.compiled_step = broken
        ids = eng.tokenizer("The quick brown fox")["input_ids"]
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        got = run_many(eng, [ids, ids[:2]], params)
        assert [evs[-1].finish_reason for evs in got] == ["length", "length"]
        assert [tokens(e) for e in got] == [tokens(e) for e in run_many(ref, [ids, ids[:2]], params)]
        assert len(calls) == 1 and eng.compile_status == "off (failed while serving: RuntimeError)"
        assert eng.info().extra["compile"] == eng.compile_status
    finally:
        eng.shutdown()
        ref.shutdown()


def test_layers_that_differ_keep_their_guards(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled step skips dynamo's per-call module guards only when every layer has the same
    signature, so one graph serves every layer on that layer's own weights. A layer unlike the
    others (here an o_proj bias the first lacks) must get a graph of its own. One layer per call,
    so every call after the first reuses a graph: the compiled step equals the eager one."""
    import qserve.compilation as qc

    monkeypatch.setattr(qc, "group_size", lambda n, largest=6: 1)
    model = load_model(tiny_dir, torch.float32, 64)
    cfg = model.cfg
    ids = torch.tensor([list(range(3, 15))])
    for differ in (False, True):
        if differ:
            model.layers[1].o_proj.bias = torch.nn.Parameter(torch.randn(cfg.hidden_size), requires_grad=False)
        assert (qc.layer_signature(model.layers[0]) != qc.layer_signature(model.layers[1])) is differ
        assert ("guard_filter_fn" not in qc._guard_options(model)) is differ
        caches = [KVCache(cfg.num_layers, 2, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32) for _ in range(2)]
        torch._dynamo.reset()
        assert setup_compiled_decode("on", model, caches[1], 2, 64).startswith("on")
        for cache in caches:
            model(ids, Batch.make([0], [0], 12), cache)
        batch = Batch.make([0], [12], 1, bucket=64, max_len=64)
        want = model(torch.tensor([[5]]), batch, caches[0])
        got = model.decode(torch.tensor([[5]]), batch, caches[1])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_compiled_step_with_short_key_padding_equals_eager(tiny_dir: Path) -> None:
    """The engine pads the compiled step's key length to COMPILED_KV_BUCKET (16), not the eager
    step's 64: the batch-1 and the batch graph, on key lengths that are not multiples of 64,
    equal the eager step."""
    from qserve.engine import COMPILED_KV_BUCKET

    model = load_model(tiny_dir, torch.float32, 64)
    cfg = model.cfg
    cache = KVCache(cfg.num_layers, 4, 64, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert setup_compiled_decode("on", model, cache, 4, COMPILED_KV_BUCKET).startswith("on")
    prompts = {0: list(range(5, 25)), 2: list(range(40, 47)), 3: list(range(60, 90))}
    for slots in ([2], [3, 0, 2]):
        got, want = _decode_vs_eager(model, slots, prompts, bucket=COMPILED_KV_BUCKET)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def _decode_vs_eager(model, slots: list[int], prompts: dict[int, list[int]], cache_slots: int = 4,
                     bucket: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill `prompts` (slot -> ids) into two caches, then one decode token per slot in `slots`:
    (compiled step's logits, eager forward's logits). The model must be compiled already."""
    cfg, dt = model.cfg, model.dtype
    caches = [KVCache(cfg.num_layers, cache_slots, 64, cfg.num_kv_heads, cfg.head_dim, dt) for _ in range(2)]
    for cache in caches:
        for slot, p in prompts.items():
            model(torch.tensor([p]), Batch.make([slot], [0], len(p)), cache)
    batch = Batch.make(slots, [len(prompts[s]) for s in slots], 1, bucket=bucket, max_len=64)
    assert batch.kv_len == -(-(max(len(prompts[s]) for s in slots) + 1) // bucket) * bucket
    ids = torch.tensor([[7 + i] for i in range(len(slots))])
    return model.decode(ids, batch, caches[1]), model(ids, batch, caches[0])


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "plain"), (torch.bfloat16, "plain"),
                                          (torch.bfloat16, "tiled"), (torch.bfloat16, "tiled-w8")])
def test_unpacked_dense_layouts_read_weights_in_graph(tiny_tied_dir: Path, dtype: torch.dtype, layout: str,
                                                      monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Unpacked weights (the single-stream layouts): the batch-1 graph computes every linear and the
    head inside the graph (linear.gemv on plain rows, linear.gemv_tiled on tiles: bf16, or int8
    codes of an RTN w8 model and its int8 head), the batch graph calls the library matmul; both
    equal the eager step to the dtype's precision."""
    import qserve.linear as ql
    import qserve.woq as woq

    fn = "gemv" if layout == "plain" else "gemv_tiled"
    traced = []
    real = getattr(ql, fn)
    monkeypatch.setattr(ql, fn, lambda *a: traced.append(a[1].shape) or real(*a))
    monkeypatch.setattr(woq, "gemv_tiled", ql.gemv_tiled)  # woq imported it by name
    if layout == "tiled-w8":
        model = load_model(request.getfixturevalue("tiny_rtn8_dir"), dtype, 64, int8_head=True)
    else:
        model = load_model(tiny_tied_dir, dtype, 64)
    cfg = model.cfg
    if layout != "plain":
        assert model.tile_linears() == 4 * cfg.num_layers + 1
    assert setup_compiled_decode("on", model, KVCache(cfg.num_layers, 4, 64, cfg.num_kv_heads, cfg.head_dim, dtype),
                                 4, 64).startswith("on")
    # traced once, in the batch-1 graph: each layer's 4 linears and the head
    head_shape = (cfg.vocab_size, cfg.hidden_size) if layout == "plain" else (cfg.vocab_size // ql.TILE, cfg.hidden_size, ql.TILE)
    assert len(traced) == 4 * cfg.num_layers + 1 and traced[-1] == head_shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    prompts = {0: list(range(5, 25)), 2: list(range(40, 47)), 3: list(range(60, 90))}
    for slots in ([2], [3, 0, 2]):
        got, want = _decode_vs_eager(model, slots, prompts)
        torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


def test_tiled_weights_compute_what_plain_ones_do() -> None:
    """DenseLinear.tile keeps the same bytes in another order: untile gives the weight back bit for
    bit; eager calls (a few rows as a batched matmul over the tiles, many rows on the weight copied
    back) and the compiled one-row gemv_tiled equal the plain linear to bf16 precision; packing a
    tiled weight packs the plain one. Only bf16 weights with N a multiple of TILE are tiled."""
    import qserve.linear as ql

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    plain, tiled = DenseLinear(w, b, torch.bfloat16), DenseLinear(w, b, torch.bfloat16)
    assert tiled.tile() and not tiled.tile()  # a tiled weight is left as it is
    assert tiled.weight.shape == (96 // ql.TILE, 64, ql.TILE) and tiled.weight_bytes() == plain.weight_bytes()
    assert torch.equal(ql.untile(tiled.weight), plain.weight)
    for rows in (1, 5, ql.TILED_BMM_ROWS + 36):
        x = torch.randn(rows, 1, 64, generator=g).to(torch.bfloat16)
        want = plain(x).float()
        torch.testing.assert_close(tiled(x).float(), want, rtol=0, atol=1e-2 * want.abs().max().item())
    x = torch.randn(1, 1, 64, generator=g).to(torch.bfloat16)
    want = plain(x).float()
    got = torch.compile(tiled)(x).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())
    if can_pack(torch.bfloat16):
        tiled.pack()
        assert tiled.packed and not tiled.tiled
        torch.testing.assert_close(tiled(x).float(), want, rtol=0, atol=1e-2 * want.abs().max().item())
    assert not DenseLinear(torch.randn(40, 64), None, torch.bfloat16).tile()  # N not a multiple of TILE
    assert not DenseLinear(w, b, torch.float32).tile()


def test_tiled_int8_head_computes_what_the_int8_kernel_does() -> None:
    """An int8 WeightOnlyLinear (the int8 head) tiled: the compiled one-row GEMV dequantizes in its
    loop and equals `_weight_int8pack_mm`'s result to bf16 precision, eager calls run the kernel on
    the codes untiled, and untile gives the codes back bit for bit. int4 is never tiled."""
    from qserve.woq import WeightOnlyLinear, quantize_rows_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    stored = quantize_rows_int8(lambda i, j: w[i:j], tuple(w.shape))
    kernel, tiled = (WeightOnlyLinear(stored, 64, 96, 8, -1) for _ in range(2))
    assert tiled.tile() and not tiled.tile() and tiled.weight_packed.shape == (3, 64, 32)
    x = torch.randn(1, 1, 64, generator=g).to(torch.bfloat16)
    want = kernel(x).float()
    tol = 1e-2 * want.abs().max().item()
    torch.testing.assert_close(torch.compile(tiled, options=INDUCTOR_OPTIONS)(x).float(), want, rtol=0, atol=tol)
    torch.testing.assert_close(tiled(x).float(), want, rtol=0, atol=0)  # eager: the same kernel
    tiled.untile()
    assert not tiled.tiled and torch.equal(tiled.weight_packed, kernel.weight_packed)
    rtn4 = {"qweight": torch.zeros(96, 8, dtype=torch.int32), "scales": torch.ones(96, 2, dtype=torch.float16),
            "qzeros": torch.full((96, 2), 8, dtype=torch.uint8)}
    assert not WeightOnlyLinear(rtn4, 64, 96, 4, 32).tile()


def test_tiled_int8_rows_compute_what_the_int8_kernel_does() -> None:
    """gemm_tiled, the compiled batch graph's read of a tiled int8 weight: one graph with a dynamic
    row count (1 to 9: whole row groups, padded ones, a single row) equals `_weight_int8pack_mm`
    on the untiled codes to bf16 precision, bias and leading dimensions included."""
    import qserve.linear as ql
    from qserve.woq import WeightOnlyLinear, quantize_rows_int8

    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    stored = quantize_rows_int8(lambda i, j: w[i:j], tuple(w.shape)) | {"bias": bias}
    kernel, tiled = (WeightOnlyLinear(stored, 64, 96, 8, -1) for _ in range(2))
    assert tiled.tile()
    step = torch.compile(lambda x: tiled(x), dynamic=True, options=INDUCTOR_OPTIONS)  # rows > 1 in the graph: gemm_tiled
    for rows in (2, 3, 4, 5, 8, 9, 1):
        x = torch.randn(rows, 1, 64, generator=g).to(torch.bfloat16)
        want = kernel(x).float()
        assert want.shape == (rows, 1, 96)
        direct = ql.gemm_tiled(x, tiled.weight_packed, tiled.bias, tiled.weight_scale)  # eager, any row count
        for got in (step(x).float(), direct.float()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-2 * want.abs().max().item())


def test_multi_stream_engine_reads_its_int8_head_tiled(tiny_rtn4_dir: Path) -> None:
    """A multi-stream engine whose step compiles holds a quantized model's int8 head tiled (read in
    place by both graphs and by the prefill's last row, through the compiled head), its other weights
    as they were; batch sizes 1..5 and prefills then compile nothing new. Eager: the kernel's layout."""
    from torch._dynamo.utils import counters

    from qserve.woq import WeightOnlyLinear

    for compile_mode, want in (("on", True), ("off", False)):
        eng = make_engine(tiny_rtn4_dir, dtype="bfloat16", max_num_seqs=5, max_model_len=128, compile=compile_mode)
        try:
            assert eng.model.lm_head.tiled is want
            assert not any(m.tiled for m in eng.model.layers.modules() if isinstance(m, WeightOnlyLinear))
            if compile_mode == "on":
                graphs = counters["stats"]["unique_graphs"]
                ids = eng.tokenizer("The quick brown fox")["input_ids"]
                params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
                for n in (1, 2, 5):
                    assert all(len(tokens(evs)) == 40 for evs in run_many(eng, [ids] * n, params))
                assert counters["stats"]["unique_graphs"] == graphs
        finally:
            eng.shutdown()


def test_models_compiled_in_one_process_keep_their_own_graphs(tiny_dir: Path, tiny_rtn4_dir: Path) -> None:
    """Two models of different structure compiled in one process, no reset between: dynamo caches
    graphs per code object, and the step skips module guards, so a shared cache would run the
    first model's graph on the second. Each must decode what its own eager step does."""
    models = [load_model(d, torch.bfloat16, 64, int8_head=d == tiny_rtn4_dir) for d in (tiny_dir, tiny_rtn4_dir)]
    for m in models:
        cfg = m.cfg
        cache = KVCache(cfg.num_layers, 4, 64, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
        assert setup_compiled_decode("on", m, cache, 4, 64).startswith("on")
    prompts = {0: list(range(5, 25)), 1: list(range(40, 47))}
    for m in models:
        for slots in ([1], [0, 1]):
            got, want = _decode_vs_eager(m, slots, prompts)
            torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())


@pytest.mark.skipif(not can_pack(torch.float32), reason="oneDNN is not built in")
def test_dense_layout_policy(tiny_dir: Path, tiny_rtn4_dir: Path) -> None:
    """auto lays unquantized weights out for the compiled batch-1 step (tiled in bf16, plain in
    fp32) only for a single-stream engine whose step compiles, and packs them otherwise (also when
    the step turns out not to compile); packed/plain/tiled force it. The single-stream fp32 plain
    engine's greedy tokens equal an eager, packed engine's."""
    def layout(eng: TorchEngine) -> str:
        (got,) = {"packed" if m.packed else "tiled" if m.tiled else "plain"
                  for m in eng.model.modules() if isinstance(m, DenseLinear)}
        return got

    cases = [({"max_num_seqs": 1, "compile": "on"}, "plain"),
             ({"max_num_seqs": 2, "compile": "on"}, "packed"),
             ({"max_num_seqs": 1, "compile": "off"}, "packed"),
             ({"max_num_seqs": 1, "compile": "auto", "kv_format": "int8"}, "packed"),  # the step does not compile
             ({"max_num_seqs": 1, "compile": "on", "dense_layout": "packed"}, "packed"),
             ({"max_num_seqs": 2, "compile": "on", "dense_layout": "plain"}, "plain"),
             ({"max_num_seqs": 1, "compile": "on", "dtype": "bfloat16"}, "tiled"),
             ({"max_num_seqs": 1, "compile": "auto", "kv_format": "int8", "dtype": "bfloat16"}, "packed"),
             ({"max_num_seqs": 2, "compile": "on", "dtype": "bfloat16", "dense_layout": "tiled"}, "tiled")]
    for compile_mode, head_tiled in (("on", True), ("off", False)):  # a quantized model's int8 head
        eng = make_engine(tiny_rtn4_dir, dtype="bfloat16", max_num_seqs=1, compile=compile_mode)
        try:
            assert eng.model.lm_head.tiled is head_tiled
        finally:
            eng.shutdown()
    ids = [3, 17, 42, 8, 99]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = []
    for cfg, want in cases:
        eng = make_engine(tiny_dir, **{"dtype": "float32", **cfg})
        try:
            assert layout(eng) == want, cfg
            if cfg in (cases[0][0], cases[2][0]):
                outs.append(tokens(run_many(eng, [ids], params)[0]))
        finally:
            eng.shutdown()
    assert outs[0] == outs[1] and len(outs[0]) == 12
    with pytest.raises(ConfigError, match="dense layout"):
        make_engine(tiny_dir, dense_layout="blocked")


def test_compiled_step_math_matches_the_eager_forms() -> None:
    """The compiled step's RoPE and attention forms against the eager ones: RoPE on D's halves is
    the same products and sums, so bitwise equal; the inline attention is the same fp32 math in
    another order (GQA groups, a padded key masked out)."""
    from qserve.attention import decode_attention, inline_decode_attention
    from qserve.model import apply_rope, apply_rope_halves

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 12, 1, 64, generator=g).to(dtype)
        angle = torch.rand(2, 1, 1, 32, generator=g) * 6.3
        cos = torch.cat([angle.cos()] * 2, -1).to(dtype)
        sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)
        assert torch.equal(apply_rope_halves(x, cos, sin), apply_rope(x, cos, sin))

        q = torch.randn(2, 9, 1, 64, generator=g).to(dtype)
        k, v = (torch.randn(2, 3, 40, 64, generator=g).to(dtype) for _ in range(2))
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[1, ..., 30:] = False
        want = decode_attention(q, k, v, mask)
        got = inline_decode_attention(q, k, v, mask)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        k[1, :, 30:] = 1e4  # a masked key must not count
        torch.testing.assert_close(inline_decode_attention(q, k, v, mask), got, rtol=0, atol=0)
