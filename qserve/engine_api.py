"""The engine interface the server drives. Two implementations: our embedded torch engine
(qserve.engine.TorchEngine) and vLLM's AsyncLLM (qserve.vllm_engine). The server only sees this."""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from qserve.errors import QServeError


class RequestRejected(QServeError):
    """The request is valid JSON but cannot be served as asked (too long, bad sampling values)."""


class EngineBusy(QServeError):
    """Admission control said no: the waiting queue is full or the engine is not admitting."""

    def __init__(self, message: str, retry_after: float = 1.0, status: int = 429):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


def check_admission(prompt_ids: list[int], params: "SamplingParams", max_model_len: int, stopping: bool,
                    waiting: float, max_waiting: int) -> None:
    """The admission rules every engine applies before queueing a request."""
    if not prompt_ids:
        raise RequestRejected("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise RequestRejected(
            f"this model's maximum context length is {max_model_len} tokens; the request "
            f"asks for {len(prompt_ids)} prompt + {params.max_tokens} completion tokens"
        )
    if stopping:
        raise EngineBusy("the engine is shutting down", status=503)
    if waiting >= max_waiting:
        raise EngineBusy("too many requests are waiting; retry later")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        # below ~1e-5 the scaled logits overflow to inf; the distribution is argmax anyway
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass
class GenerationEvent:
    """One streamed piece of a request's output."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None


@dataclass
class EngineInfo:
    engine: str
    model_id: str
    model_dir: str
    quant_method: str  # "none" for fp checkpoints
    dtype: str
    max_model_len: int
    max_num_seqs: int
    weight_bytes: int
    kv_cache_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


class RequestHandle:
    """Async stream of GenerationEvents for one request; thread-safe to feed from an engine thread."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = False
        self.finished = False

    def push(self, event: GenerationEvent) -> None:
        """Called from any thread. A consumer whose event loop is gone counts as cancelled."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:
            self.cancelled = True

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        while True:
            ev = await self._queue.get()
            yield ev
            if ev.finish_reason is not None:
                self.finished = True
                return


class Engine(abc.ABC):
    tokenizer: Any
    max_model_len: int
    # qserve's decode-step compilation (qserve.compilation), "on (...)" while it serves; engines
    # that do not compile their own way through qserve leave it at "n/a"
    compile_status: str = "n/a"

    @abc.abstractmethod
    def info(self) -> EngineInfo: ...

    @abc.abstractmethod
    def start(self) -> None:
        """Begin serving (load, spawn workers). Blocking; called once before submit."""

    @abc.abstractmethod
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestHandle:
        """Queue a request. Raises RequestRejected / EngineBusy."""

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """running, waiting and other gauges for /metrics."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...
