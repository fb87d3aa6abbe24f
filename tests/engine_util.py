"""Helpers to drive an Engine from synchronous tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from qserve.compilation import toolchain_problem
from qserve.engine import EngineConfig, TorchEngine
from qserve.engine_api import Engine, GenerationEvent, SamplingParams
from qserve.tokenizer import load_tokenizer

needs_compiler = pytest.mark.skipif(toolchain_problem() is not None, reason=f"{toolchain_problem()}")


def make_engine(model_dir: Path, **cfg) -> TorchEngine:
    eng = TorchEngine(model_dir, model_dir.name, load_tokenizer(model_dir), EngineConfig(**cfg))
    eng.start()
    return eng


async def collect(engine: Engine, rid: str, ids: list[int], params: SamplingParams) -> list[GenerationEvent]:
    return [ev async for ev in engine.submit(rid, ids, params)]


def run_many(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[GenerationEvent]]:
    async def main() -> list[list[GenerationEvent]]:
        return await asyncio.gather(*[collect(engine, str(i), p, params) for i, p in enumerate(prompts)])

    return asyncio.run(main())


def tokens(events: list[GenerationEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]
