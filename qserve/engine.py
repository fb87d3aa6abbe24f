"""The embedded CPU engine: continuous batching over a slot-based KV cache, in one worker thread.

Scheduling policy (FCFS with a token budget per step): each step first spends up to
`prefill_chunk` prompt tokens on the oldest sequences still prefilling (a long prompt is cut
into chunks, so it never stalls running streams for more than one chunk), then runs one batched
decode forward for every sequence that is generating. New requests take a free slot between
steps; when no slot is free they wait in order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from concurrent.futures import Future
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qserve.config import ModelConfig, load_config
from qserve.detok import StreamDecoder
from qserve.errors import ConfigError
from qserve.engine_api import (
    Engine, EngineBusy, EngineInfo, GenerationEvent, RequestHandle, RequestRejected, SamplingParams, check_admission,
)
from qserve.attention import get_attention
from qserve.compilation import setup_compiled_decode, will_try_compile
from qserve.kvcache import Batch, KVCache, get_kv_format
from qserve.model import CausalLM, decode_head, load_model
from qserve.sampling import make_generator, sample
from qserve.sysmem import release_free_memory

log = logging.getLogger("qserve.engine")

KV_BUCKET = 64  # eager decode key lengths are padded to a multiple of this (see Batch.make)
# The compiled step's key length is dynamic (one graph for every length, no per-shape kernels), so
# it pads only to the fp32 vector width: less padded attention work. SmolLM2-135M int4 g32, keys
# 32-96, paired in-process rounds: batch 8 1.04x faster than at 64 (min 1.00), batch 1 unchanged.
COMPILED_KV_BUCKET = 16
PREFILL_BUCKET = 32  # prefill chunks are padded to a multiple of this
DENSE_LAYOUTS = ("auto", "packed", "plain", "tiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """'auto' is bf16: the int4/int8 CPU kernels need bf16 activations, and bf16 fp matmuls are
    ~2.5x faster than fp32 on these CPUs."""
    if name == "auto":
        return torch.bfloat16
    return DTYPES[name]


@dataclass
class EngineConfig:
    max_model_len: int = 2048
    max_num_seqs: int = 8
    prefill_chunk: int = 512
    max_waiting: int = 64
    dtype: str = "auto"
    threads: int | None = None
    head: str = "auto"  # "int8", "model" (as stored), or "auto": int8 for quantized checkpoints
    kv_format: str = "auto"  # a name registered in qserve.kvcache; auto: cskv for CSKV checkpoints, else model
    bitstack_blocks: int | None = None  # BitStack checkpoints: blocks of the stack to load (None: all)
    attention: str = "sdpa"  # a name registered in qserve.attention
    compile: str = "off"  # torch.compile the decode step: auto (when it applies), on (or fail), off
    dense_layout: str = "auto"  # unquantized weights: packed (oneDNN), plain, tiled, or auto (TorchEngine.dense_layout)


@dataclass
class _Seq:
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    decoder: StreamDecoder
    gen: torch.Generator
    slot: int = -1
    done_prompt: int = 0  # prompt tokens already in the cache
    output: list[int] = field(default_factory=list)
    t_arrival: float = field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return self.done_prompt + len(self.output)


class TorchEngine(Engine):
    def __init__(self, model_dir: Path, model_id: str, tokenizer: Any, cfg: EngineConfig):
        self.model_dir = Path(model_dir)
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.mcfg = load_config(self.model_dir)
        self.max_model_len = min(cfg.max_model_len, self.mcfg.max_position_embeddings)
        self.dtype = resolve_dtype(cfg.dtype, self.mcfg)
        self.eos_ids = set(self.mcfg.eos_token_ids) | set(_generation_eos(self.model_dir))
        self.model: CausalLM | None = None
        self.cache: KVCache | None = None
        self._inbox: queue.SimpleQueue[_Seq | None] = queue.SimpleQueue()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._free_slots: list[int] = list(range(cfg.max_num_seqs))
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._pending: dict[str, Any] | None = None
        self.stack = None
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.steps = 0
        self.compile_status = "off"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model and start the engine thread; raises what loading raised.

        Why the load runs on the engine thread: libgomp keeps one OpenMP team per thread that runs
        parallel torch ops, and when the teams together hold more threads than there are cores it
        stops spin-waiting between parallel regions. A model loaded on the caller's thread left a
        second team behind and made every decode step ~2x slower (SmolLM2 int4, 2 cores: 24 vs
        11.5 ms per token). All torch work of an engine therefore happens on its own thread.
        """
        loaded: Future[None] = Future()

        def run() -> None:
            try:
                self._setup()
            except BaseException as e:  # handed to start()'s caller
                loaded.set_exception(e)
                return
            loaded.set_result(None)
            self._loop()

        self._thread = threading.Thread(target=run, name="qserve-engine", daemon=True)
        self._thread.start()
        loaded.result()

    def _setup(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.model = self._load(self.model_dir, self.cfg.bitstack_blocks)
        self.model.attention = get_attention(self.cfg.attention)
        m = self.mcfg
        fmt = self.cfg.kv_format
        if fmt == "auto":
            from qserve.kvformats import kv_compression

            fmt = "cskv" if kv_compression(m) else "model"
        self.cache = get_kv_format(fmt)(
            m.num_layers, self.cfg.max_num_seqs, self.max_model_len, m.num_kv_heads, m.head_dim, self.dtype)
        if hasattr(self.cache, "bind"):
            self.cache.bind(self.model)  # allocate compressed storage now, so nbytes() is exact
        self._compile()

    def _compile(self) -> None:
        assert self.model is not None and self.cache is not None
        self.compile_status = setup_compiled_decode(self.cfg.compile, self.model, self.cache,
                                                    self.cfg.max_num_seqs, COMPILED_KV_BUCKET)
        if self.model.compiled_step is None:
            self._pack_for_eager()

    @property
    def dense_layout(self) -> str:
        """How unquantized weights are laid out: packed (oneDNN), plain rows, or tiled (DenseLinear.tile;
        tiled also lays int8 linears and heads out for the compiled step, WeightOnlyLinear.tile).

        auto: tiled (plain in fp32) for a single-stream engine (max_num_seqs 1) whose decode step is
        compiled, packed otherwise. Why: a compiled batch-1 step reads tiled weights in-graph
        (qserve.linear.gemv_tiled) faster than plain rows (1.25-1.6x, paired in-process), which it
        reads faster than it calls the packed matmul (SmolLM2-135M bf16 decode, bench/decode_ab.py:
        93 -> 123 tok/s), while batched decode and prefill run the library matmul, which is 1.5-2x
        faster on packed weights (same model, 4 and 8 streams: 315 -> 186, 524 -> 342 aggregate
        tok/s on plain ones). The bytes are the same every way. A packed engine whose step will
        compile still tiles a quantized model's int8 head, which both graphs read faster tiled (_load)."""
        layout = self.cfg.dense_layout
        if layout not in DENSE_LAYOUTS:
            raise ConfigError(f"dense layout must be one of {DENSE_LAYOUTS}, got {layout!r}")
        if layout != "auto":
            return layout
        if self.cfg.max_num_seqs == 1 and will_try_compile(self.cfg.compile):
            return "tiled" if self.dtype == torch.bfloat16 else "plain"  # DenseLinear.tile: bf16 only
        return "packed"

    def _pack_for_eager(self) -> None:
        """The eager step runs the library matmuls at every batch size: tiles were only for the
        compiled step, and auto's plain layout too."""
        assert self.model is not None
        self.model.untile_linears()
        if self.cfg.dense_layout == "auto" and self.model.pack_dense_linears():
            log.info("decode runs eager: unquantized weights packed for the library matmul")

    def _load(self, model_dir: Path, blocks: int | None) -> CausalLM:
        cfg = load_config(model_dir)
        int8_head = self.cfg.head == "int8" or (self.cfg.head == "auto" and cfg.quant_method is not None)
        if cfg.quant_method == "qserve-bitstack":
            from qserve.quant_methods.bitstack_stack import BitStackStack

            self.stack = BitStackStack(model_dir)
            model = self.stack.load_model(blocks, self.dtype, self.max_model_len, int8_head=int8_head)
        else:
            self.stack = None
            model = load_model(model_dir, self.dtype, self.max_model_len, int8_head=int8_head)
        layout = self.dense_layout
        if layout == "packed":
            model.pack_dense_linears()
            if will_try_compile(self.cfg.compile):
                # an int8 head is read in place by both compiled graphs (gemv_tiled, gemm_tiled):
                # SmolLM2-135M's, against `_weight_int8pack_mm`, 1.0 vs 2.0 ms at 1 row, 4.1 vs 6.0 at 8
                model.tile_linears(head_only=True)
        elif layout == "tiled":
            model.tile_linears()
        return model

    def resident_weight_bytes(self) -> int:
        if self.model is None:
            return 0
        if self.stack is not None:
            return self.stack.resident_model_bytes(self.model, self.dtype)
        return self.model.weight_bytes()

    def reconfigure(self, model_dir: Path, blocks: int | None, timeout: float = 300.0) -> dict[str, Any]:
        """Serve `model_dir` (holding `blocks` of its BitStack stack) from now on, without a restart.

        Same BitStack checkpoint: blocks are loaded or dropped in place between two engine steps;
        running requests go on with the new weights. Another checkpoint: new requests wait in the
        queue while running ones finish (drain), then the new model is loaded and replaces the old.
        Runs on the engine thread; blocks the caller until done. No request fails.
        """
        done = threading.Event()
        cmd = {"dir": Path(model_dir), "blocks": blocks, "done": done, "result": None, "error": None}
        self._commands.put(cmd)
        self._inbox.put(None)  # wake an idle loop
        if not done.wait(timeout):
            raise EngineBusy("the resize did not finish in time; it continues in the background", status=503)
        if cmd["error"] is not None:
            raise cmd["error"]
        return cmd["result"]

    def _run_command(self) -> bool:
        """Apply the pending reconfiguration if it can run now; True while one is pending."""
        if self._pending is None:
            try:
                self._pending = self._commands.get_nowait()
            except queue.Empty:
                return False
            self._pending["t0"] = time.perf_counter()
        cmd = self._pending
        in_place = self.stack is not None and cmd["dir"].resolve() == self.model_dir.resolve()
        if not in_place and self._running:
            return True  # drain first: running requests finish, waiting ones stay queued
        try:
            if in_place:
                n = cmd["blocks"] if cmd["blocks"] is not None else self.stack.total_blocks
                report = self.stack.apply(self.model, n)
                release_free_memory()  # dropped blocks leave the process, not just the model
                mode = f"in place: +{report.added} / -{report.dropped} blocks, {report.bytes_read} bytes read"
            else:
                new_cfg = load_config(cmd["dir"])
                if (new_cfg.num_layers, new_cfg.kv_dim, new_cfg.vocab_size) != (
                        self.mcfg.num_layers, self.mcfg.kv_dim, self.mcfg.vocab_size):
                    raise RequestRejected(f"{cmd['dir']} is not a variant of the served model")
                self.model = None  # let the old weights go before the new ones load
                self.model = self._load(cmd["dir"], cmd["blocks"])
                self.model.attention = get_attention(self.cfg.attention)
                self.model_dir, self.mcfg = cmd["dir"], new_cfg
                # the old model's graphs go: dynamo keeps at most 8 per function, and a server
                # switching among variants would otherwise fall back to eager after a few swaps
                torch._dynamo.reset()
                self._compile()
                mode = "reloaded after draining"
            cmd["result"] = {"model_dir": str(self.model_dir), "quant_method": self.mcfg.quant_method or "none",
                             "blocks": cmd["blocks"], "weight_bytes": self.resident_weight_bytes(),
                             "seconds": time.perf_counter() - cmd["t0"], "mode": mode}
        except Exception as e:  # reported to the caller; the engine keeps serving what it has
            log.exception("reconfiguration failed")
            cmd["error"] = e
        self._pending = None
        cmd["done"].set()
        return False

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="torch", model_id=self.model_id, model_dir=str(self.model_dir),
            quant_method=self.mcfg.quant_method or "none", dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=self.max_model_len, max_num_seqs=self.cfg.max_num_seqs,
            weight_bytes=self.resident_weight_bytes(),
            kv_cache_bytes=self.cache.nbytes() if self.cache else 0,
            extra={"blocks": self.stack.current_blocks(self.model) if self.stack is not None and self.model else None,
                   "compile": self.compile_status},
        )

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting) + self._inbox.qsize()}

    # -- admission ---------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        check_admission(prompt_ids, params, self.max_model_len, self._stop.is_set(), self.stats()["waiting"],
                        self.cfg.max_waiting)
        handle = RequestHandle(request_id, asyncio.get_running_loop())
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": tuple(sorted(stop_ids))})
        seq = _Seq(handle, list(prompt_ids), params, StreamDecoder(self.tokenizer, prompt_ids[-4:], params.stop),
                   make_generator(params.seed))
        self._inbox.put(seq)
        return handle

    # -- the worker loop ---------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            idle = not self._running and not self._waiting
            try:
                item = self._inbox.get(timeout=0.5) if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            with self._lock:
                while item is not None:
                    self._waiting.append(item)
                    try:
                        item = self._inbox.get_nowait()
                    except queue.Empty:
                        item = None
                self._reap_cancelled()
            draining = self._run_command()
            with self._lock:
                while self._waiting and self._free_slots and not draining:
                    seq = self._waiting.popleft()
                    seq.slot = self._free_slots.pop(0)
                    self._running.append(seq)
            if self._running:
                try:
                    self._step()
                except Exception as e:  # a bug must fail its requests, not hang them
                    log.exception("engine step failed")
                    for seq in list(self._running):
                        self._finish(seq, "error", error=f"internal engine error: {type(e).__name__}")
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "abort")

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, "abort")
        self._waiting = collections.deque(s for s in self._waiting if not s.handle.cancelled)

    def _step(self) -> None:
        assert self.model is not None and self.cache is not None
        self.steps += 1
        budget = self.cfg.prefill_chunk
        for seq in [s for s in self._running if s.done_prompt < len(s.prompt)]:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt) - seq.done_prompt)
            budget -= n
            # pad the chunk to a multiple of PREFILL_BUCKET (masked by causality, overwritten by
            # the next writes) so prefill matmuls see few shapes; see KV_BUCKET
            bucket = PREFILL_BUCKET if self.model.pad_safe else 1
            padded = min(-(-n // bucket) * bucket, self.max_model_len - seq.done_prompt)
            chunk = seq.prompt[seq.done_prompt:seq.done_prompt + n]
            ids = torch.tensor([chunk + [chunk[-1]] * (padded - n)])
            logits = self.model(ids, Batch.make([seq.slot], [seq.done_prompt], padded), self.cache, logit_index=n - 1)
            seq.done_prompt += n
            if seq.done_prompt == len(seq.prompt):
                self._sample_and_emit(seq, logits[0])
        decoding = [s for s in self._running if s.done_prompt == len(s.prompt) and s.output]
        if decoding:
            decoding.sort(key=lambda s: s.slot)
            ids = torch.tensor([[s.output[-1]] for s in decoding])
            bucket = COMPILED_KV_BUCKET if self.model.compiled_step is not None else KV_BUCKET
            batch = Batch.make([s.slot for s in decoding], [s.length - 1 for s in decoding], 1,
                               bucket=bucket, max_len=self.max_model_len)
            logits = self._decode(ids, batch)
            # greedy rows take one argmax over the batch, not one call per row
            greedy = logits.argmax(-1).tolist() if any(s.params.greedy for s in decoding) else []
            for row, seq in enumerate(decoding):
                self._sample_and_emit(seq, logits[row], greedy[row] if seq.params.greedy else None)

    def _decode(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """One decode forward, compiled when it can be. A compiled step that fails (a compile
        it should never need, a kernel error) hands over to the eager step for good, on this very
        step: the eager step rewrites the same cache positions, so nothing half-written remains."""
        assert self.model is not None and self.cache is not None
        if self.model.compiled_step is not None:
            try:
                return self.model.decode(ids, batch, self.cache)
            except Exception as e:
                log.exception("the compiled decode step failed; decoding eager from now on")
                self.model.compiled_step, self.model.compiled_head = None, decode_head
                self._pack_for_eager()
                self.compile_status = f"off (failed while serving: {type(e).__name__})"
        return self.model(ids, batch, self.cache)

    def _sample_and_emit(self, seq: _Seq, logits: torch.Tensor, token: int | None = None) -> None:
        """Emit `token`, or one sampled from `logits` when None. A failure here belongs to one
        request: it ends that one, not the batch."""
        try:
            if token is None:
                token = sample(logits, seq.params, seq.gen)
        except RuntimeError as e:
            log.warning("sampling failed for %s: %s", seq.handle.request_id, e)
            self._finish(seq, "error", error=f"sampling failed: {e}")
            return
        self._emit(seq, token)

    def _emit(self, seq: _Seq, token: int) -> None:
        p = seq.params
        if token in p.stop_token_ids:
            self._finish(seq, "stop")
            return
        seq.output.append(token)
        hit_stop = seq.decoder.add(token)
        if hit_stop:
            self._finish(seq, "stop", last_token=token)
        elif len(seq.output) >= p.max_tokens or seq.length >= self.max_model_len:
            self._finish(seq, "length", last_token=token)
        else:
            text = seq.decoder.delta(final=False)
            seq.handle.push(GenerationEvent(text, [token], len(seq.prompt), len(seq.output)))

    def _finish(self, seq: _Seq, reason: str, last_token: int | None = None, error: str | None = None) -> None:
        if seq in self._running:  # free the slot before the client can observe the end
            with self._lock:
                self._running.remove(seq)
                self._free_slots.append(seq.slot)
                self._free_slots.sort()
        text = seq.decoder.delta(final=True) if reason in ("stop", "length") else ""
        ids = [last_token] if last_token is not None else []
        seq.handle.push(GenerationEvent(text, ids, len(seq.prompt), len(seq.output), reason, error))


def _generation_eos(model_dir: Path) -> list[int]:
    import json

    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError):
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
