"""`qserve serve --engine vllm`: the server's Engine contract over vLLM's V1 engine, in process.

vLLM's `AsyncLLM` cannot run its engine core in process (vLLM 0.32 raises NotImplementedError
for asyncio without multiprocessing), and its multiprocess mode costs 20-30 s and ~1.2 GB more
at start on these machines. So this engine drives vLLM's in-process `LLMEngine`
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: same scheduler, KV cache manager, model runner and
kernels) from one worker thread, exactly as TorchEngine drives our model: requests come in
through a queue, every `step()` returns new tokens, and a cancelled handle aborts its request.
Tensor parallelism still works: vLLM starts its own worker processes for TP > 1.

Prompts arrive as token ids and vLLM runs without a tokenizer; text is produced by our
StreamDecoder, so streamed text, stop strings and finish reasons behave as with `--engine torch`.

A memory-budget change is not applied in place: vLLM sizes its KV cache once at start. The
supported path is to restart `qserve serve` (or reload this engine after draining) on the
variant the new budget selects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qserve.config import load_config
from qserve.detok import StreamDecoder
from qserve.engine_api import (
    Engine, EngineInfo, GenerationEvent, RequestHandle, SamplingParams, check_admission,
)
from qserve.errors import ConfigError, QServeError

log = logging.getLogger("qserve.vllm_engine")

DEFAULT_CPU_KV_GIB = 1.0  # vLLM's CPU default asks for 92% of NUMA node 0 and fails to start


def _home() -> Path:
    return Path(os.environ.get("QSERVE_HOME") or "~/.cache/qserve").expanduser() / "vllm"


def configure_vllm_env(threads: int | None = None, kv_cache_gib: float | None = None) -> dict[str, str]:
    """Environment vLLM reads, set before it is imported; values already set are kept.

    Returns what was set. In-process engine, loopback host, offline hub, caches and the socket
    files vLLM leaves in TMPDIR under $QSERVE_HOME/vllm, and OMP_NUM_THREADS (all our cores, or
    `threads`) so vLLM does not drop the process to one torch thread. OpenMP threads are not
    pinned: on a shared 2-core machine (load ~13) pinning them made decode 6x slower (SmolLM2-135M
    bf16, batch 1: 0.53 vs 3.4 tok/s); set VLLM_CPU_OMP_THREADS_BIND to pin on a dedicated host.
    """
    n = len(os.sched_getaffinity(0)) if threads is None else threads
    tmp = _home() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    want = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_HOST_IP": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(_home() / "cache"),
        "TMPDIR": str(tmp),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(n),
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib if kv_cache_gib is not None else DEFAULT_CPU_KV_GIB:g}",
    }
    done = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(done)
    return done


@dataclass
class VLLMOptions:
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_waiting: int = 64
    dtype: str = "auto"
    threads: int | None = None
    tensor_parallel_size: int = 1
    kv_cache_space: float | None = None  # GiB of KV cache (CPU: VLLM_CPU_KVCACHE_SPACE)
    enforce_eager: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # further vllm EngineArgs

    @classmethod
    def from_args(cls, args: Any) -> "VLLMOptions":
        """From `qserve serve`'s namespace; flags it does not define keep their defaults. Further
        vLLM EngineArgs come from $QSERVE_VLLM_ARGS (a JSON object) and --vllm-arg KEY=VALUE."""
        d = cls()
        try:
            extra = json.loads(os.environ.get("QSERVE_VLLM_ARGS") or "{}")
        except json.JSONDecodeError as e:
            raise ConfigError(f"QSERVE_VLLM_ARGS is not JSON: {e}") from None
        if not isinstance(extra, dict):
            raise ConfigError("QSERVE_VLLM_ARGS must be a JSON object of vLLM engine arguments")
        for item in getattr(args, "vllm_arg", None) or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--vllm-arg wants KEY=VALUE, got {item!r}")
            try:
                extra[key.replace("-", "_")] = json.loads(value)
            except json.JSONDecodeError:
                extra[key.replace("-", "_")] = value
        return cls(**{f: getattr(args, f, None) if getattr(args, f, None) is not None else getattr(d, f)
                      for f in ("max_model_len", "max_num_seqs", "max_waiting", "dtype", "threads",
                                "tensor_parallel_size", "kv_cache_space", "enforce_eager")}, extra=extra)


@dataclass
class _Req:
    rid: str
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    decoder: StreamDecoder
    completion: int = 0


class _Stats:
    """A vLLM stat logger keeping the latest scheduler gauges and running token counters."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {"kv_cache_usage": 0.0, "scheduler_running": 0, "scheduler_waiting": 0,
                                         "prompt_tokens_total": 0.0,
                                         "generation_tokens_total": 0.0, "preemptions_total": 0.0,
                                         "prefix_cache_queries_total": 0.0, "prefix_cache_hits_total": 0.0}
        self.lock = threading.Lock()

    def logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self

        class QServeStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                with stats.lock:
                    v = stats.values
                    if scheduler_stats is not None:
                        v["kv_cache_usage"] = float(scheduler_stats.kv_cache_usage)
                        v["scheduler_running"] = scheduler_stats.num_running_reqs
                        v["scheduler_waiting"] = scheduler_stats.num_waiting_reqs
                        pc = scheduler_stats.prefix_cache_stats
                        v["prefix_cache_queries_total"] += pc.queries
                        v["prefix_cache_hits_total"] += pc.hits
                    if iteration_stats is not None:
                        v["prompt_tokens_total"] += iteration_stats.num_prompt_tokens
                        v["generation_tokens_total"] += iteration_stats.num_generation_tokens
                        v["preemptions_total"] += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self) -> None:
                pass

        return QServeStatLogger


class VLLMEngine(Engine):
    def __init__(self, model_dir: Path, model_id: str, tokenizer: Any, args: Any):
        self.model_dir = Path(model_dir)
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.opts = VLLMOptions.from_args(args)
        self.mcfg = load_config(self.model_dir)
        self.max_model_len = min(self.opts.max_model_len, self.mcfg.max_position_embeddings)
        self.dtype = "bfloat16" if self.opts.dtype == "auto" else self.opts.dtype
        from qserve.engine import _generation_eos

        self.eos_ids = frozenset(self.mcfg.eos_token_ids) | frozenset(_generation_eos(self.model_dir))
        self._inbox: queue.SimpleQueue[_Req | None] = queue.SimpleQueue()
        self._running: dict[str, _Req] = {}
        self._stats = _Stats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self._info_extra: dict[str, Any] = {}
        self._weight_bytes = 0
        self._kv_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        configure_vllm_env(self.opts.threads, self.opts.kv_cache_space)
        if self.opts.threads:
            import torch

            torch.set_num_threads(self.opts.threads)  # torch may have read OMP_NUM_THREADS already
        self._thread = threading.Thread(target=self._run, name="qserve-vllm", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            e = self._load_error
            if isinstance(e, QServeError):
                raise e
            raise ConfigError(f"vLLM could not load {self.model_dir}: {type(e).__name__}: {e}") from e

    def _build(self) -> Any:
        import vllm
        from vllm import EngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.llm_engine import LLMEngine

        o = self.opts
        kw: dict[str, Any] = dict(
            model=str(self.model_dir), dtype=self.dtype, max_model_len=self.max_model_len,
            max_num_seqs=o.max_num_seqs, tensor_parallel_size=o.tensor_parallel_size,
            skip_tokenizer_init=True, enforce_eager=o.enforce_eager, served_model_name=self.model_id,
        )
        if o.kv_cache_space is not None and not current_platform.is_cpu():
            kw["kv_cache_memory_bytes"] = int(o.kv_cache_space * 2**30)
        kw.update(o.extra)
        engine = LLMEngine.from_engine_args(EngineArgs(**kw), stat_loggers=[self._stats.logger_factory()])
        cc = engine.vllm_config.cache_config
        m = self.mcfg
        elem = 4 if self.dtype == "float32" else 2
        self._kv_bytes = int((cc.num_gpu_blocks or 0) * cc.block_size * 2 * m.num_layers * m.num_kv_heads
                             * m.head_dim * elem)
        self._weight_bytes = sum(engine.apply_model(_resident_bytes))
        self._info_extra = {
            "vllm_version": vllm.__version__, "device": current_platform.device_name,
            "tensor_parallel_size": o.tensor_parallel_size, "kv_cache_tokens": (cc.num_gpu_blocks or 0) * cc.block_size,
            "enforce_eager": o.enforce_eager,
        }
        return engine

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="vllm", model_id=self.model_id, model_dir=str(self.model_dir),
            quant_method=self.mcfg.quant_method or "none", dtype=self.dtype,
            max_model_len=self.max_model_len, max_num_seqs=self.opts.max_num_seqs,
            weight_bytes=self._weight_bytes, kv_cache_bytes=self._kv_bytes, extra=dict(self._info_extra),
        )

    def stats(self) -> dict[str, float]:
        """running / waiting as our server counts them, plus vLLM's scheduler and token stats."""
        with self._stats.lock:
            out = dict(self._stats.values)
        running, waiting = out.pop("scheduler_running"), out.pop("scheduler_waiting")
        engine = self._engine
        if engine is None or engine.get_num_unfinished_requests() == 0:
            running = waiting = 0  # the scheduler's last gauges predate the step that finished them
        return out | {"running": running, "waiting": waiting + self._inbox.qsize()}

    # -- admission ---------------------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        check_admission(prompt_ids, params, self.max_model_len, self._stop.is_set(), self.stats()["waiting"],
                        self.opts.max_waiting)
        handle = RequestHandle(request_id, asyncio.get_running_loop())
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        self._inbox.put(_Req(request_id, handle, list(prompt_ids), params, stop_ids,
                             StreamDecoder(self.tokenizer, prompt_ids[-4:], params.stop)))
        return handle

    # -- the worker thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._engine = self._build()
        except BaseException as e:  # reported by start() in the caller's thread
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        engine = self._engine
        while not self._stop.is_set():
            busy = engine.has_unfinished_requests()
            try:
                item = self._inbox.get_nowait() if busy else self._inbox.get(timeout=0.5)
            except queue.Empty:
                item = None
            while item is not None:
                self._add(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            for req in [r for r in self._running.values() if r.handle.cancelled]:
                self._finish(req, "abort", abort=True)
            if engine.has_unfinished_requests():
                try:
                    for out in engine.step():
                        self._on_output(out)
                except Exception as e:  # a failure must end its requests, not hang them
                    log.exception("vLLM step failed")
                    for req in list(self._running.values()):
                        self._finish(req, "error", abort=True, error=f"internal engine error: {type(e).__name__}")
        for req in list(self._running.values()):
            self._finish(req, "abort", abort=True)
        self._close()

    def _add(self, req: _Req) -> None:
        from vllm import SamplingParams as VSP
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if req.handle.cancelled:
            req.handle.push(GenerationEvent("", [], len(req.prompt), 0, "abort"))
            return
        p = req.params
        # EOS ids are already in stop_ids; vLLM's own EOS check would ignore the client's ignore_eos
        sp = VSP(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                 seed=p.seed, stop_token_ids=sorted(req.stop_ids), ignore_eos=True, detokenize=False,
                 output_kind=RequestOutputKind.DELTA)
        try:
            self._engine.add_request(req.rid, TokensPrompt(prompt_token_ids=req.prompt), sp)
        except Exception as e:
            log.exception("vLLM rejected request %s", req.rid)
            req.handle.push(GenerationEvent("", [], len(req.prompt), 0, "error", f"vLLM rejected the request: {e}"))
            return
        self._running[req.rid] = req

    def _on_output(self, out: Any) -> None:
        req = self._running.get(out.request_id)
        if req is None:
            return
        c = out.outputs[0]
        tokens = list(c.token_ids)
        if c.finish_reason == "stop" and tokens and tokens[-1] in req.stop_ids:
            tokens.pop()  # like our engine: a stop token is neither emitted nor counted
        for i, t in enumerate(tokens):
            req.completion += 1
            if req.decoder.add(t):
                self._finish(req, "stop", abort=not out.finished, last=t)
                return
            if out.finished and i == len(tokens) - 1:
                self._finish(req, c.finish_reason or "stop", last=t)
                return
            req.handle.push(GenerationEvent(req.decoder.delta(final=False), [t], len(req.prompt), req.completion))
        if out.finished:
            self._finish(req, c.finish_reason or "stop")

    def _finish(self, req: _Req, reason: str, abort: bool = False, last: int | None = None,
                error: str | None = None) -> None:
        if abort:
            self._engine.abort_request([req.rid])
        text = req.decoder.delta(final=True) if reason in ("stop", "length") else ""
        req.handle.push(GenerationEvent(text, [] if last is None else [last], len(req.prompt), req.completion,
                                        reason, error))
        self._running.pop(req.rid, None)

    def _close(self) -> None:
        """Free the engine and vLLM's process-wide state, so a new engine can start here."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        engine, self._engine = self._engine, None
        try:
            engine.engine_core.shutdown()
        finally:
            del engine
            cleanup_dist_env_and_memory()


def _resident_bytes(model: Any) -> int:
    """Bytes of one worker's model weights (parameters and buffers, shared storage once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
