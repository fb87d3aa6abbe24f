"""End-to-end probe of a running qserve container (called by deploy/check.sh).

Why a client and not curl: it is what users run. It checks readiness, auth, a real chat
completion through the `openai` client, the Prometheus exposition, the memory budget seen inside
the container, and that SIGTERM lets an in-flight streamed request finish before a clean exit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import http.client
import urllib.error
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


class SmokeError(Exception):
    """A check failed; the message says which and what was seen."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise SmokeError(message)


def http_status(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when the connection fails."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return 0, ""


def podman(*args: str) -> str:
    out = subprocess.run(["podman", *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def container_state(name: str) -> str:
    return podman("inspect", "--format", "{{.State.Status}}", name)


def wait_ready(base: str, container: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        status, body = http_status(f"{base}/ready")
        if status == 200:
            return time.monotonic() - start
        state = container_state(container)
        check(state == "running", f"container {state} before /ready (last /ready: {status} {body})")
        time.sleep(0.5)
    raise SmokeError(f"/ready not 200 within {timeout:.0f}s")


def check_budget_source(container: str, limit_bytes: int) -> str:
    """`auto` inside the container must see the container's memory limit, not the host's."""
    code = (
        "import json; from qserve.sysmem import available_memory, auto_budget; "
        "a = available_memory(); print(json.dumps([a.bytes, a.source, auto_budget()]))"
    )
    avail, source, budget = json.loads(podman("exec", container, "python", "-c", code))
    check(source.startswith("cgroup"), f"auto budget did not read the cgroup limit: {source}")
    check(0 < budget < avail <= limit_bytes, f"budget {budget} / available {avail} vs limit {limit_bytes}")
    return f"{budget / 2**30:.2f} GiB from {source}"


def check_chat(client: openai.OpenAI, model: str) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=16,
        temperature=0,
    )
    text = r.choices[0].message.content or ""
    check(r.object == "chat.completion", f"unexpected object {r.object!r}")
    check(r.usage is not None and r.usage.completion_tokens > 0, f"no completion tokens: {r.usage}")
    check(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason {r.choices[0].finish_reason}")
    return text


def check_metrics(base: str, headers: dict[str, str], limit_bytes: int) -> str:
    status, body = http_status(f"{base}/metrics", headers)
    check(status == 200, f"/metrics answered {status}")
    families = list(text_string_to_metric_families(body))
    names = {f.name for f in families}
    check(any(n.startswith("qserve_") for n in names), f"no qserve_ metrics among {sorted(names)[:10]}")
    chat = [
        s.value
        for f in families
        for s in f.samples
        if s.name == "qserve_requests_total" and s.labels.get("endpoint") == "/v1/chat/completions"
    ]
    check(sum(chat) >= 1, "qserve_requests_total did not count the chat completion")
    budget = [s.value for f in families for s in f.samples if s.name == "qserve_memory_budget_bytes"]
    check(len(budget) == 1, f"qserve_memory_budget_bytes missing or repeated: {budget}")
    # The host has far more memory than the container: a budget under the limit came from it.
    check(0 < budget[0] <= limit_bytes, f"server budget {budget[0]} not within the limit {limit_bytes}")
    return f"{len(families)} metric families parsed, server budget {budget[0] / 2**30:.2f} GiB"


def check_sigterm_drain(client: openai.OpenAI, base: str, container: str, model: str) -> str:
    """SIGTERM while a stream is in flight: the stream must finish, /ready must stop saying 200,
    and the container must exit 0."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    before = after = 0
    finish = None
    ready_after: list[int] = []
    sent = False

    def poll_ready() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status, _ = http_status(f"{base}/ready")
            ready_after.append(status)
            if status != 200:
                return
            time.sleep(0.05)

    poller = threading.Thread(target=poll_ready)
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            if sent:
                after += 1
            else:
                before += 1
        if choice.finish_reason:
            finish = choice.finish_reason
        if before == 3 and not sent:
            podman("kill", "--signal", "TERM", container)
            sent = True
            poller.start()
    check(sent, "stream ended before SIGTERM could be sent")
    check(finish == "length", f"in-flight stream did not finish normally (finish_reason {finish})")
    check(after > 0, "no tokens arrived after SIGTERM: the request was not in flight")
    poller.join()
    check(ready_after and ready_after[-1] != 200, f"/ready still 200 after SIGTERM: {ready_after}")
    code = podman("wait", container)  # blocks until the container exits
    check(code == "0", f"container exit code {code} after SIGTERM (want 0)")
    return f"{before} tokens before SIGTERM, {after} after, finish_reason={finish}, exit 0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:18000")
    ap.add_argument("--container", required=True, help="podman container name")
    ap.add_argument("--api-key", default="", help="the key the server was started with")
    ap.add_argument("--memory-limit", type=int, required=True, help="container limit in bytes")
    ap.add_argument("--ready-timeout", type=float, default=180)
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        took = wait_ready(base, args.container, args.ready_timeout)
        print(f"  ready after {took:.1f}s")
        status, _ = http_status(f"{base}/health")
        check(status == 200, f"/health answered {status}")
        podman("healthcheck", "run", args.container)  # the image's HEALTHCHECK, run by hand
        print("  HEALTHCHECK: healthy")
        print(f"  memory budget (auto): {check_budget_source(args.container, args.memory_limit)}")
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=args.api_key or "none", max_retries=0)
        if args.api_key:
            status, _ = http_status(f"{base}/v1/models")
            check(status == 401, f"/v1/models without the API key answered {status}, want 401")
            print("  no API key: 401")
        models = [m.id for m in client.models.list().data]
        check(len(models) == 1, f"/v1/models lists {models}")
        print(f"  /v1/models: {models}")
        print(f"  chat completion: {check_chat(client, models[0])!r}")
        print(f"  /metrics: {check_metrics(base, auth, args.memory_limit)}")
        print(f"  SIGTERM drain: {check_sigterm_drain(client, base, args.container, models[0])}")
    except (SmokeError, openai.OpenAIError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"FAIL: {type(e).__name__}: {e} {detail}".rstrip(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
