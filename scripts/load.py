"""Load test of `vlmspec serve` on loopback: N concurrent streaming clients (the real `openai` client) for T
seconds, then a summary: requests/s, tokens/s, time to first token and per-token latency (p50/p99), errors, the
server's RSS at start and end, and the mean τ of the answers.

Bounded: at most 256 clients, 600 s and --max-requests requests; only loopback addresses. Either it starts the
server itself (everything after `--` goes to `vlmspec serve`), or it attaches to one with --url (and --pid for RSS):

    python scripts/load.py --concurrency 32 --duration 60 -- --target testbed --drafter testbed:flash
    python scripts/load.py --url http://127.0.0.1:8000 --pid 1234 --concurrency 8 --duration 30

Prompts and images come from a testbed suite (`--suite`, default describe), images as data URLs, greedy.
Per-token latency of a request = (last token time - first token time) / (tokens - 1): the time per output token
after the first. Requests still running at T finish and count; none starts after T.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai

MAX_CONCURRENCY, MAX_DURATION = 256, 600.0


@dataclass
class Outcome:
    started: float
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0
    tau: float | None = None
    error: str | None = None


@dataclass
class Summary:
    concurrency: int
    duration_s: float
    wall_s: float
    requests: int
    errors: int
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    per_token_p50_ms: float
    per_token_p99_ms: float
    mean_tau: float
    rss_start_mib: float | None
    rss_end_mib: float | None
    error_samples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"load.py: error: {url} is not a loopback address; this script only loads local servers")


def suite_messages(name: str, limit: int) -> list[list[dict]]:
    """OpenAI chat messages of a testbed suite's samples: each HF `{"type": "image"}` part becomes an image_url
    part with the sample's next image as a data URL."""
    from vlmspec.bench.suites import read_suite
    from vlmspec.inputs import prompt_to_messages
    from vlmspec.testbed.data import default_suite

    converted = []
    for sample in read_suite(default_suite(name), name)[:limit]:
        images = iter(sample.images)
        messages = sample.messages or prompt_to_messages(sample.prompt, len(sample.images))
        openai_messages = []
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                    next(images).read_bytes()).decode()}} if part["type"] == "image" else part for part in content]
            openai_messages.append({"role": message["role"], "content": content})
        converted.append(openai_messages)
    return converted


async def one_request(api: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int) -> Outcome:
    outcome = Outcome(started=time.perf_counter())
    try:
        stream = await api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
        async for chunk in stream:
            extension = (chunk.model_extra or {}).get("vlmspec") or {}
            if outcome.first_token is None and extension.get("token_ids"):
                outcome.first_token = time.perf_counter()
            if "answer" in extension:
                outcome.tau = extension["answer"]["tau"]
            if chunk.usage:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.finished = time.perf_counter()
    except Exception as error:  # noqa: BLE001 - every failure is a counted, reported error of the run
        outcome.error = f"{type(error).__name__}: {error}"[:300]
    return outcome


async def run_load(url: str, concurrency: int, duration: float, max_requests: int, max_tokens: int,
                   suite: str, pid: int | None) -> Summary:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="load", max_retries=0, timeout=300,
                             http_client=openai.DefaultAsyncHttpxClient(
                                 limits=httpx.Limits(max_connections=concurrency + 4)))
    model = (await api.models.list()).data[0].id
    prompts = suite_messages(suite, 64)
    await one_request(api, model, prompts[0], max_tokens)                      # warm-up, not counted
    rss_start = rss_mib(pid)
    outcomes: list[Outcome] = []
    issued = 0
    start = time.perf_counter()
    end = start + duration

    async def client_loop() -> None:
        nonlocal issued
        while time.perf_counter() < end and issued < max_requests:
            messages = prompts[issued % len(prompts)]
            issued += 1
            outcomes.append(await one_request(api, model, messages, max_tokens))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    rss_end = rss_mib(pid)
    good = [o for o in outcomes if o.error is None]
    ttft = [(o.first_token - o.started) * 1000 for o in good if o.first_token is not None]
    per_token = [(o.finished - o.first_token) * 1000 / (o.tokens - 1) for o in good
                 if o.first_token is not None and o.tokens > 1]
    taus = [o.tau for o in good if o.tau is not None]
    errors = [o.error for o in outcomes if o.error is not None]
    return Summary(concurrency=concurrency, duration_s=duration, wall_s=round(wall, 2), requests=len(good),
                   errors=len(errors), requests_per_s=len(good) / wall,
                   tokens_per_s=sum(o.tokens for o in good) / wall,
                   ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
                   per_token_p50_ms=percentile(per_token, 50), per_token_p99_ms=percentile(per_token, 99),
                   mean_tau=statistics.fmean(taus) if taus else float("nan"), rss_start_mib=rss_start,
                   rss_end_mib=rss_end, error_samples=errors[:5])


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    """`vlmspec serve … --port 0` as a child process on 127.0.0.1; its URL once /health answers."""
    command = [sys.executable, "-m", "vlmspec.cli", "serve", *serve_args, "--host", "127.0.0.1", "--port", "0",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"load.py: error: the server did not start: {line}{process.stderr.read()}")
    url = f"http://127.0.0.1:{match.group(1)}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"load.py: error: the server exited: {process.stderr.read()}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit("load.py: error: the server did not answer /health within 300 s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] (--url URL [--pid PID] | -- SERVE ARGS…)")
    parser.add_argument("--url", default=None, help="a running server on loopback (else: start one from SERVE ARGS)")
    parser.add_argument("--pid", type=int, default=None, help="the running server's process id, for its RSS")
    parser.add_argument("--concurrency", type=int, default=8, help=f"concurrent clients (1..{MAX_CONCURRENCY})")
    parser.add_argument("--duration", type=float, default=30.0, help=f"seconds of load (<= {MAX_DURATION:.0f})")
    parser.add_argument("--max-requests", type=int, default=10_000, help="stop issuing after this many requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--suite", default="describe", help="testbed suite whose prompts and images are sent")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    args = parser.parse_args(own)
    if not 1 <= args.concurrency <= MAX_CONCURRENCY or not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--concurrency must be in 1..{MAX_CONCURRENCY} and --duration in (0, {MAX_DURATION:.0f}]")
    if (args.url is None) == (not serve_args):
        parser.error("give either --url or the server's arguments after --")
    process = None
    if args.url is None:
        process, url = start_server(serve_args)
        pid = process.pid
    else:
        check_loopback(args.url)
        url, pid = args.url.rstrip("/"), args.pid
    try:
        summary = asyncio.run(run_load(url, args.concurrency, args.duration, args.max_requests, args.max_tokens,
                                       args.suite, pid))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print(json.dumps(asdict(summary), indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(summary), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
