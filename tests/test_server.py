"""The HTTP API over real sockets: the official openai client, SSE, errors, metrics."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_util import ThreadedServer, start_cli_server
from qserve.engine import EngineConfig, TorchEngine
from qserve.server.app import create_app
from qserve.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def server(tiny_dir: Path):
    eng = TorchEngine(tiny_dir, "tiny", load_tokenizer(tiny_dir), EngineConfig(dtype="float32", max_model_len=256))
    with ThreadedServer(create_app(eng, "tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_and_stream_agree(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == choice.message.content
    assert finish == choice.finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True))
    assert text == full.choices[0].text
    assert full.usage.completion_tokens <= 8


BAD = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400),
    ("unknown model", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400),
    ("missing messages", "/v1/chat/completions", {"model": "tiny"}, 400),
    ("negative max_tokens", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400),
    ("oversized max_tokens", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400),
    ("bad temperature", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 400),
    ("string temperature", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("n=2", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ("prompt over context", "/v1/completions", {"model": "tiny", "prompt": "fox " * 400}, 400),
    ("empty prompt", "/v1/completions", {"model": "tiny", "prompt": ""}, 400),
    ("token id out of vocab", "/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]}, 400),
    ("body not an object", "/v1/completions", b"[1, 2]", 400),
]


@pytest.mark.parametrize("name,path,body,status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error(server, name: str, path: str, body, status: int) -> None:
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.base + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "code" in err
    # and the server keeps serving
    ok = httpx.post(server.base + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_metrics_parse_and_move(server, client: openai.OpenAI) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(server.base + "/metrics").text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name
                out[key] = s.value
        return out

    before = scrape()
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                   temperature=0, extra_body={"ignore_eos": True})
    after = scrape()
    ok = 'qserve_requests_total{"endpoint": "/v1/chat/completions", "status": "200"}'
    assert after[ok] == before.get(ok, 0) + 1
    assert after["qserve_generation_tokens_total"] == before["qserve_generation_tokens_total"] + 5
    assert after["qserve_prompt_tokens_total"] > before["qserve_prompt_tokens_total"]
    assert after["qserve_time_to_first_token_seconds_count"] == before["qserve_time_to_first_token_seconds_count"] + 1
    assert after["qserve_inter_token_latency_seconds_count"] >= before["qserve_inter_token_latency_seconds_count"] + 4
    assert after["qserve_weight_bytes"] > 0
    assert after['qserve_model_info{"dtype": "float32", "engine": "torch", "model": "tiny", "quant_method": "none"}'] == 1


def test_eight_concurrent_streams_match_solo(server) -> None:
    import concurrent.futures as cf

    c = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
    prompts = [f"Hello number {i}, what is" for i in range(8)]

    def stream(p: str) -> str:
        out = c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
        return "".join(ch.choices[0].text for ch in out)

    solo = [stream(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(stream, prompts))
    assert together == solo


def test_cli_serve_rtn4_with_openai_client(tiny_rtn4_dir: Path) -> None:
    """`qserve serve` as users run it, on an int4 checkpoint; SIGTERM exits cleanly."""
    proc, base = start_cli_server(tiny_rtn4_dir, "--served-model-name", "tiny-int4")
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="tiny-int4", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
        assert r.choices[0].finish_reason in ("length", "stop")
        metrics = httpx.get(base + "/metrics").text
        assert 'quant_method="qserve-rtn"' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sigterm_drains_inflight_streams(tiny_dir: Path) -> None:
    """SIGTERM while 4 streams run: /ready turns 503, all 4 finish complete, exit status 0."""
    import concurrent.futures as cf
    import threading

    proc, base = start_cli_server(tiny_dir, "--served-model-name", "tiny", "--dtype", "float32", "--drain-delay", "1")
    started = threading.Barrier(5)
    c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)

    def stream(i: int) -> tuple[str | None, int]:
        out = c.completions.create(model="tiny", prompt=f"count {i}", max_tokens=150, temperature=0, stream=True,
                                   extra_body={"ignore_eos": True})
        n, finish = 0, None
        for k, ch in enumerate(out):
            if k == 1:
                started.wait(timeout=60)
            n += 1
            finish = ch.choices[0].finish_reason or finish
        return finish, n

    try:
        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(stream, i) for i in range(4)]
            started.wait(timeout=60)
            proc.send_signal(signal.SIGTERM)
            r = httpx.get(base + "/ready", timeout=5)
            assert r.status_code == 503 and r.json()["status"] == "draining"
            results = [f.result(timeout=120) for f in futs]
        assert all(finish == "length" for finish, _ in results), results
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def secured(tiny_dir: Path):
    from qserve.server.security import SecuritySettings

    eng = TorchEngine(tiny_dir, "tiny", load_tokenizer(tiny_dir), EngineConfig(dtype="float32", max_model_len=256))
    sec = SecuritySettings(api_keys=("key-one", "key-two"), admin_token="adm1n", max_body_bytes=2048)
    with ThreadedServer(create_app(eng, "tiny", security=sec)) as s:
        yield s


def test_api_keys(secured) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    url = secured.base + "/v1/completions"
    assert httpx.post(url, json=body).status_code == 401
    r = httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for key in ("key-one", "key-two"):
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.base + "/v1", api_key="nope", max_retries=0).models.list()
    for open_path in ("/health", "/ready", "/metrics"):
        assert httpx.get(secured.base + open_path).status_code == 200
    assert "key-one" not in httpx.get(secured.base + "/metrics").text


def test_admin_token_separate_from_api_keys(secured, server) -> None:
    url = secured.base + "/admin/status"
    assert httpx.get(url, headers={"Authorization": "Bearer key-one"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer adm1n"}).status_code == 200
    r = httpx.get(server.base + "/admin/status", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_body_limit(secured) -> None:
    h = {"Authorization": "Bearer key-one"}
    big = {"model": "tiny", "prompt": "x" * 5000, "max_tokens": 2}
    r = httpx.post(secured.base + "/v1/completions", json=big, headers=h)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(10):
            yield b"y" * 500
        yield b'"}'

    r = httpx.post(secured.base + "/v1/completions", content=chunks(), headers=h | {"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(secured.base + "/v1/completions", json={"model": "tiny", "prompt": "ok", "max_tokens": 2},
                      headers=h).status_code == 200
