"""`qserve serve`: the OpenAI-compatible server over the embedded engine (or vLLM)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"QSERVE_{name}", default)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", default=_env("MODEL"),
                   help="checkpoint directory, cached hub id or pull alias (env QSERVE_MODEL)")
    p.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(_env("PORT", "8000")))
    p.add_argument("--served-model-name", default=_env("SERVED_MODEL_NAME"),
                   help="model id clients send (default: the directory name)")
    p.add_argument("--memory-budget", default=_env("MEMORY_BUDGET"),
                   help="serve the best variant that fits: bytes, a size (3GiB) or 'auto' (the container's "
                        "memory limit); MODEL may be a family directory of variants (see qserve plan)")
    p.add_argument("--runtime-overhead", default=_env("RUNTIME_OVERHEAD", "measure"),
                   help="bytes the budget planner adds to weights + KV: 'measure' (this process's RSS once "
                        "the serving stack and tokenizer are loaded, plus an allowance for requests) or a size")
    p.add_argument("--engine", choices=["torch", "vllm"], default=_env("ENGINE", "torch"))
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=_env("DTYPE", "auto"))
    p.add_argument("--max-model-len", type=int, default=int(_env("MAX_MODEL_LEN", "2048")))
    p.add_argument("--max-num-seqs", type=int, default=int(_env("MAX_NUM_SEQS", "8")),
                   help="sequences decoded together (KV cache slots)")
    p.add_argument("--max-waiting", type=int, default=int(_env("MAX_WAITING", "64")),
                   help="queued requests beyond which new ones get 429")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per engine step")
    p.add_argument("--kv-format", choices=["auto", "model", "int8", "int4", "cskv"], default=_env("KV_FORMAT", "auto"),
                   help="KV cache format: model = the compute dtype; int8/int4 quantized per head and group; "
                        "auto = cskv for CSKV checkpoints, else model")
    p.add_argument("--attention", choices=["sdpa", "sage", "sage8"], default=_env("ATTENTION", "sdpa"),
                   help="attention implementation (sage: SageAttention2-style INT4 QK / FP8 PV)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=_env("COMPILE", "auto"),
                   help="torch.compile the decode step before serving (~6 s at start, ~20-35 s with a cold "
                        "cache; ~1.4x faster batch-1 decode of int4 SmolLM2): auto = when the model and KV "
                        "format allow it and a C++ compiler is installed; on = or fail")
    p.add_argument("--dense-layout", choices=["auto", "packed", "plain", "tiled"], default=_env("DENSE_LAYOUT", "auto"),
                   help="unquantized (fp32/bf16) weights: packed = oneDNN's layout, fastest for batched "
                        "decode and prefill; tiled = 32 output rows per block, read in the compiled batch-1 "
                        "step, fastest for one stream; plain = as stored; auto = tiled when --max-num-seqs "
                        "is 1 and the decode step compiles, packed otherwise")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--head", choices=["auto", "int8", "model"], default=_env("HEAD", "auto"),
                   help="output head precision: auto = int8 for quantized checkpoints, as stored otherwise")
    p.add_argument("--log-level", default=_env("LOG_LEVEL", "info"))
    p.add_argument("--drain-delay", type=float, default=float(_env("DRAIN_DELAY", "0")),
                   help="seconds between SIGTERM (/ready turns 503) and closing the listener")
    p.add_argument("--grace-period", type=float, default=float(_env("GRACE_PERIOD", "30")),
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key (Authorization: Bearer KEY) on /v1; repeat for several "
                        "(env QSERVE_API_KEY, comma-separated)")
    p.add_argument("--admin-token", default=_env("ADMIN_TOKEN"),
                   help="token for /admin endpoints (env QSERVE_ADMIN_TOKEN); admin is disabled without one")
    p.add_argument("--protect-metrics", action="store_true", help="require an API key on /metrics too")
    p.add_argument("--max-body-bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(4 * 1024 * 1024))))
    p.add_argument("--request-timeout", type=float, default=float(_env("REQUEST_TIMEOUT", "600")),
                   help="seconds a request may take before it is cancelled (504 / error event)")
    p.add_argument("--self-test", action="store_true",
                   help="once ready, send one chat request to this server and print the answer")
    p.add_argument("--exit-after-self-test", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def _self_test(base: str, model: str, server, exit_after: bool, api_key: str | None) -> None:
    """Ask the running server one question over HTTP, as a user's client would."""
    import json
    import time
    import urllib.request

    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    question = "What is the capital of France? Answer in one sentence."
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": 48, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    req = urllib.request.Request(base + "/v1/chat/completions", body, headers)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            out = json.loads(r.read())
        answer = out["choices"][0]["message"]["content"]
        print(f"\n[self-test] POST /v1/chat/completions ({time.perf_counter() - t0:.1f} s, "
              f"{out['usage']['completion_tokens']} tokens)\n  user: {question}\n  assistant: {answer}\n", flush=True)
    except OSError as e:
        print(f"[self-test] failed: {e}", flush=True)
    if exit_after:
        server.should_exit = True


def resolve_model(source: str):
    """A directory as is; otherwise a cached hub id or a `qserve pull` alias."""
    from pathlib import Path

    from qserve.checkpoint import resolve_model_dir
    from qserve.errors import CheckpointError

    if Path(source).expanduser().exists():
        return resolve_model_dir(source)
    try:
        from qserve.pull import resolve_or_pull
    except ImportError:
        return resolve_model_dir(source)
    try:
        return resolve_or_pull(source)
    except CheckpointError:
        raise
    except Exception as e:  # pull's own errors are QServeErrors; anything else is reported plainly
        raise CheckpointError(f"cannot resolve model {source!r}: {e}") from e


def tokenizer_dir(family_dir):
    """Where the tokenizer is: the checkpoint itself, or the first variant of a family holding one
    (variants of one model share it: `qserve quantize` copies the tokenizer files)."""
    from qserve.planner import discover
    from qserve.tokenizer import has_tokenizer

    if (family_dir / "config.json").is_file():
        return family_dir
    return next((v.dir for v in discover(family_dir) if has_tokenizer(v.dir)), family_dir)


def will_compile(args: argparse.Namespace) -> bool:
    """Whether the engine will try to compile its decode step (it may still find the model unfit)."""
    from qserve.compilation import will_try_compile

    return args.engine == "torch" and will_try_compile(args.compile)


def runtime_overhead(value: str, compiled: bool = False) -> tuple[int, str]:
    """The planner's overhead: measured in this process (see planner.serving_overhead) or given."""
    from qserve.compilation import import_compiler
    from qserve.errors import ConfigError
    from qserve.planner import serving_overhead
    from qserve.sysmem import parse_budget, process_memory

    if value.strip().lower() != "measure":
        if value.strip().lower() == "auto":
            raise ConfigError("--runtime-overhead is 'measure' or a size (e.g. 400MiB), not 'auto'")
        try:
            return parse_budget(value), "given"
        except ConfigError as e:
            raise ConfigError(f"--runtime-overhead: {e}") from None
    if compiled:
        import_compiler()
    rss = process_memory().get("rss")
    source = ("measured" if rss else "estimate") + (" + compile" if compiled else "")
    return serving_overhead(rss, compiled), source


def plan_start(args: argparse.Namespace, model_dir):
    """The budget controller and the variant to start with (model_dir itself when no budget).

    Call it once the serving stack and the tokenizer are loaded: the overhead is measured then.
    """
    from qserve.budget import BudgetController, budget_bytes
    from qserve.engine import DTYPES

    dtype = DTYPES.get(args.dtype, DTYPES["bfloat16"])
    overhead, source = runtime_overhead(args.runtime_overhead, will_compile(args))
    ctl = BudgetController(model_dir, args.max_model_len, args.max_num_seqs, dtype, args.head, args.kv_format,
                           overhead, source)
    if args.memory_budget is None:
        if not (model_dir / "config.json").is_file():
            args.memory_budget = "auto"  # a family directory: choose what fits this machine
        else:
            return ctl, model_dir, None
    choice = ctl.start(budget_bytes(args.memory_budget))
    print(f"memory budget {ctl.status()['budget_human']}: serving {choice.name}\n{ctl.plan.table()}", file=sys.stderr)
    return ctl, choice.dir, choice.blocks


def build_engine(args: argparse.Namespace, model_dir, tokenizer, blocks=None):
    from qserve.checkpoint import Checkpoint
    from qserve.config import load_config
    from qserve.engine import EngineConfig, TorchEngine

    load_config(model_dir)
    Checkpoint(model_dir)  # validates every header before the server starts
    name = args.served_model_name or model_dir.name
    if args.engine == "vllm":
        from qserve.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, name, tokenizer, args), name
    cfg = EngineConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting,
                       dtype=args.dtype, threads=args.threads, head=args.head, bitstack_blocks=blocks,
                       kv_format=args.kv_format, attention=args.attention, compile=args.compile,
                       dense_layout=args.dense_layout)
    return TorchEngine(model_dir, name, tokenizer, cfg), name


def _graceful_server(config, app, drain_delay: float):
    """A uvicorn server whose SIGTERM/SIGINT drain: /ready turns 503 at once, the listener closes
    after `drain_delay`, in-flight requests finish, and the process exits 0 (uvicorn's own
    handler re-raises the signal, which makes the exit status look like a crash)."""
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self._drain) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def _drain(self, sig, frame) -> None:
            if app.state.qserve.draining:  # a second signal: stop now
                self.force_exit = True
            app.state.qserve.draining = True
            threading.Timer(drain_delay, lambda: setattr(self, "should_exit", True)).start()

    return Server(config)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from qserve.errors import ConfigError
    from qserve.server.app import create_app

    if not args.model:
        raise ConfigError("no model given (argument or QSERVE_MODEL)")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    family_dir = resolve_model(args.model)
    from qserve.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(family_dir))
    budget, model_dir, blocks = plan_start(args, family_dir)
    engine, name = build_engine(args, model_dir, tokenizer, blocks)
    if args.served_model_name is None and model_dir != family_dir:
        name = family_dir.name
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(msg: str) -> None:
        failed.append(msg)
        if server is not None:
            server.should_exit = True

    from qserve.server.security import SecuritySettings

    keys = args.api_key or [k for k in (_env("API_KEY") or "").split(",") if k.strip()]
    security = SecuritySettings(api_keys=tuple(k.strip() for k in keys), admin_token=args.admin_token or None,
                                max_body_bytes=args.max_body_bytes, protect_metrics=args.protect_metrics)
    app = create_app(engine, name, on_load_error=on_load_error, security=security,
                     request_timeout=args.request_timeout or None, budget=budget if args.engine == "torch" else None)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                            timeout_graceful_shutdown=args.grace_period)
    server = _graceful_server(config, app, args.drain_delay)
    if args.self_test or args.exit_after_self_test:
        import threading

        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        threading.Thread(target=_self_test, args=(f"http://{host}:{args.port}", name, server,
                                                  args.exit_after_self_test, next(iter(security.api_keys), None)),
                         daemon=True).start()
    server.run()
    if failed:
        print(f"qserve serve: error: {failed[0]}", file=sys.stderr)
        return 1
    return 0
