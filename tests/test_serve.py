"""`vlmspec serve`: the OpenAI API on loopback, driven by the real `openai` client. Answers equal
`Generator.generate` (greedy and seeded sampling, plain and streamed); images by data URL and allowed local file;
concurrent clients get what they get alone; a corpus of bad requests each gets a 4xx naming its problem; the API
key; a client disconnect cancels its request; SIGTERM exits cleanly."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from vlmspec import Engine, Generator, RequestCancelled, Target, TreeConfig, build_drafter
from vlmspec.cli import main
from vlmspec.serve.app import create_app
from vlmspec.serve.config import ImageLimits, ServeConfig
from vlmspec.testing import save_tiny_model

MODEL = "tiny"
TREE = TreeConfig(kind="dynamic", depth=3, topk=2, total_tokens=6)
LIMITS = dict(max_images=3, max_image_bytes=100_000, max_pixels=256 * 256)
MAX_BODY = 600_000


@contextmanager
def running(engine: Engine, config: ServeConfig):
    """The app on a free loopback port, served by uvicorn in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config, draining=lambda: server.should_exit),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def user(text: str, *urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def hf_user(text: str, images: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height with one tiny (wrong) data chunk: a decompression-bomb stand-in."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("llava"), "llava", lm_head_scale=8.0)
    return Target.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def drafter(target):
    return build_drafter("eagle", target, seed=0)


@pytest.fixture(scope="module")
def generator(target, drafter):
    return Generator(target, drafter, TREE)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An allowed root with an image, and ways out of it: a file beside it and a symlink to that file."""
    base = tmp_path_factory.mktemp("media")
    root = base / "root"
    root.mkdir()
    noise(30, 24, seed=1).save(root / "cat.png")
    noise(30, 24, seed=2).save(base / "outside.png")
    (root / "link.png").symlink_to(base / "outside.png")
    return root


def recording(engine: Engine) -> tuple[Engine, list]:
    """The engine, with every request the server submits to it kept in the returned list."""
    handles, submit = [], engine.submit
    engine.submit = lambda **kwargs: handles.append(submit(**kwargs)) or handles[-1]
    return engine, handles


class Served(NamedTuple):
    url: str
    handles: list                  # every request the server submitted to its engine


@pytest.fixture(scope="module")
def server(target, drafter, media):
    config = ServeConfig(model_name=MODEL, max_body_bytes=MAX_BODY,
                         images=ImageLimits(**LIMITS, allowed_local_media_path=media))
    engine, handles = recording(Engine(target, drafter, TREE, max_batch=8))
    with running(engine, config) as url:
        yield Served(url, handles)


@pytest.fixture(scope="module")
def image_url():
    return data_url(encode(noise(30, 24, seed=1)))


def stream_answer(api: openai.OpenAI, **kwargs) -> tuple[str, list[int], list[dict], object]:
    """(text, token ids, vlmspec extension of every chunk, usage) of a streamed answer."""
    text, token_ids, extensions, usage = "", [], [], None
    for chunk in api.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                             **kwargs):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        extension = (chunk.model_extra or {}).get("vlmspec")
        if extension:
            extensions.append(extension)
            token_ids += extension.get("token_ids", [])
        usage = chunk.usage or usage
    return text, token_ids, extensions, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, seed=7)],
                         ids=["greedy", "sampled"])
def test_answers_equal_generate(server, generator, image_url, sampling):
    expected = generator.generate(images=[noise(30, 24, seed=1)], messages=hf_user("what color is the cat?", 1),
                                  max_new_tokens=16, **sampling)
    api = client(server.url)
    messages = user("what color is the cat?", image_url)
    answer = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, **sampling)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == len(expected.token_ids)
    extension = answer.model_extra["vlmspec"]
    assert extension["target_forwards"] == expected.stats.target_forwards
    assert extension["tau"] == pytest.approx(expected.stats.tau)
    accepted = sum(source > 0 for source in expected.stats.token_sources)
    assert extension["accepted_draft_tokens"] == accepted

    text, token_ids, extensions, usage = stream_answer(api, messages=messages, max_tokens=16, **sampling)
    assert text == expected.text and token_ids == expected.token_ids
    assert usage.completion_tokens == len(expected.token_ids) and usage.prompt_tokens > 0
    per_token = [e for e in extensions if "token_ids" in e]
    assert "".join(p for e in per_token for p in e["pieces"]) + extensions[-1]["rest"] == expected.text
    sources = [s for e in per_token for s in e["sources"]]
    assert len(sources) == len(token_ids) and sources[0] == 0            # the prefill's token is the target's
    assert sources == expected.stats.token_sources
    assert extensions[-1]["answer"]["target_forwards"] == expected.stats.target_forwards


def test_string_content_and_system_message(server, generator):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    expected = generator.generate(messages=messages, max_new_tokens=8, temperature=0.0)
    answer = client(server.url).chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == ("length" if len(expected.token_ids) == 8 else "stop")


def test_allowed_local_files_answer_as_data_urls(server, media, image_url):
    api = client(server.url)
    answers = [api.chat.completions.create(model=MODEL, messages=user("describe", url), max_tokens=8,
                                           temperature=0).choices[0].message.content
               for url in (image_url, f"file://{media / 'cat.png'}", "cat.png", str(media / "sub" / ".." / "cat.png"))]
    assert len(set(answers)) == 1


def test_concurrent_clients_get_what_they_get_alone(server):
    api = client(server.url)
    requests = [dict(messages=user(f"question {i} about the cat", data_url(encode(noise(20 + i, 28, seed=i)))),
                     max_tokens=6 + i, temperature=0.8 * (i % 2), seed=i) for i in range(8)]
    alone = [api.chat.completions.create(model=MODEL, **r).choices[0].message.content for r in requests]
    before = len(server.handles)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: stream_answer(api, **r)[0], requests))
    assert together == alone
    batch_sizes = [size for handle in server.handles[before:] for size in handle.stats.batch_size_per_step]
    assert max(batch_sizes) >= 2                           # they were decoded together, not one after another


def bad_requests(image_url: str, media: Path) -> list[tuple[str, object, int, str]]:
    """(case, JSON body or raw bytes, status, words the error message must contain)."""
    ok = {"model": MODEL, "messages": user("hi")}

    def body(**changes):
        return {**ok, **changes}

    def with_image(url: str):
        return body(messages=user("what is it?", url))

    gray = Image.new("L", (30, 24), 128)
    frames = [noise(16, 16, seed=s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    valid_png = encode(noise(40, 40, seed=3))
    return [
        ("bad JSON", b'{"model": "tiny", "messages": [', 400, "not valid JSON"),
        ("empty body", b"", 400, "empty"),
        ("JSON not an object", b"[1, 2]", 400, "JSON object"),
        ("NaN temperature", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                            b'"temperature": NaN}', 400, "NaN"),
        ("missing messages", {"model": MODEL}, 400, "messages"),
        ("empty messages", body(messages=[]), 400, "messages"),
        ("missing model", {"messages": user("hi")}, 400, "model"),
        ("wrong type: max_tokens", body(max_tokens="ten"), 400, "max_tokens"),
        ("wrong type: content", body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
        ("wrong type: stream", body(stream="yes"), 400, "stream"),
        ("unknown role", body(messages=[{"role": "tool", "content": "x"}]), 400, "role"),
        ("unknown part type", body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "type"),
        ("negative temperature", body(temperature=-0.5), 400, "temperature"),
        ("top_p of 0", body(top_p=0), 400, "top_p"),
        ("negative seed", body(seed=-1), 400, "seed"),
        ("n = 2", body(n=2), 400, "n must be 1"),
        ("unsupported field", body(logprobs=True), 400, "logprobs"),
        ("too many stop strings", body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
        ("unknown model", body(model="gpt-4o"), 404, "gpt-4o"),
        ("huge max_tokens", body(max_tokens=10**9), 400, "max_tokens"),
        ("prompt + max_tokens over the context", body(messages=user("a longer question " * 8), max_tokens=2040),
         400, "context"),
        ("empty prompt", body(messages=[{"role": "user", "content": " "}]), 400, "empty"),
        ("http URL", with_image("http://example.com/cat.png"), 400, "never fetches"),
        ("https URL", with_image("https://example.com/cat.png"), 400, "never fetches"),
        ("other URL scheme", with_image("ftp://example.com/cat.png"), 400, "scheme"),
        ("path escape by ..", with_image("../outside.png"), 400, "outside the allowed"),
        ("path escape by symlink", with_image("link.png"), 400, "outside the allowed"),
        ("absolute path outside", with_image(f"file://{media.parent / 'outside.png'}"), 400, "outside the allowed"),
        ("missing local file", with_image("nope.png"), 400, "no such image"),
        ("corrupt image", with_image(data_url(b"\x89PNG\r\n\x1a\nthis is not a png")), 400, "image 1"),
        ("truncated image", with_image(data_url(valid_png[: len(valid_png) // 2])), 400, "truncated"),
        ("zero-byte image", with_image("data:image/png;base64,"), 400, "empty"),
        ("1x1 image", with_image(data_url(encode(noise(1, 1)))), 400, "at least 2 pixels"),
        ("wrong MIME", with_image(data_url(encode(gray, "JPEG"), "image/png")), 400, "says PNG but the data is JPEG"),
        ("unsupported MIME", with_image(data_url(encode(gray, "BMP"), "image/bmp")), 400, "image/bmp"),
        ("BMP sent as PNG", with_image(data_url(encode(gray, "BMP"))), 400, "not a readable"),
        ("not base64", with_image("data:image/png;base64,***"), 400, "base64"),
        ("not a data URL", with_image("data:image/png,rawbytes"), 400, "base64"),
        ("animated GIF", with_image(data_url(gif.getvalue(), "image/gif")), 400, "animated"),
        ("image over the byte limit", with_image(data_url(encode(noise(200, 200)))), 400, "larger than the limit"),
        ("image over the pixel limit", with_image(data_url(encode(Image.new("L", (300, 300))))), 400, "pixels"),
        ("decompression bomb", with_image(data_url(png_header_only(60000, 60000))), 400, "pixels"),
        ("too many images", body(messages=user("four", *[image_url] * 4)), 400, "too many images"),
        ("body over the size limit", body(messages=user("x" * (MAX_BODY + 10))), 413, "over the limit"),
    ]


def test_bad_request_corpus_gets_clear_4xx_and_the_server_stays_up(server, image_url, media):
    corpus = bad_requests(image_url, media)
    assert len(corpus) >= 20
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for case, body, status, words in corpus:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            error = response.json().get("error", {}) if response.headers.get("content-type", "").startswith(
                "application/json") else {}
            if response.status_code != status or words.lower() not in str(error.get("message", "")).lower():
                failures.append(f"{case}: {response.status_code} {response.text[:200]}")
        assert not failures, "\n".join(failures)
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert http.get("/metrics").text.count('vlmspec_requests_total{status="400"}') == 1
    answer = client(server.url).chat.completions.create(model=MODEL, messages=user("still there?"), max_tokens=3)
    assert answer.usage.completion_tokens >= 1


def test_openai_client_raises_its_usual_errors(server):
    api = client(server.url)
    with pytest.raises(openai.NotFoundError, match="not found"):
        api.chat.completions.create(model="other", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="never fetches"):
        api.chat.completions.create(model=MODEL, messages=user("hi", "https://example.com/cat.png"))


def test_models_health_metrics_and_page(server):
    models = client(server.url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    with httpx.Client(base_url=server.url) as http:
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
        for name in ("vlmspec_requests_total", "vlmspec_running_rows", "vlmspec_waiting_rows",
                     "vlmspec_generated_tokens_total", "vlmspec_target_forwards_total", "vlmspec_tau_bucket",
                     "vlmspec_time_to_first_token_seconds_bucket", "vlmspec_request_seconds_bucket"):
            assert name in metrics, name
        finished = [h for h in server.handles if h.done and h.stats.new_tokens and not h.cancel_requested]
        for name, expected in (("prompt_tokens", sum(h.prompt_tokens for h in finished)),
                               ("generated_tokens", sum(h.stats.new_tokens for h in finished)),
                               ("target_forwards", sum(h.stats.target_forwards for h in finished))):
            assert float(re.search(rf"^vlmspec_{name}_total (\S+)$", metrics, re.M).group(1)) == expected, name
        page = http.get("/")
        assert page.status_code == 200 and "<script>" in page.text and "/v1/chat/completions" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert http.get("/docs").status_code == 404                # no API explorer loading scripts from a CDN


def test_api_key_is_required(target):
    config = ServeConfig(model_name=MODEL, api_key="s3cret")
    with running(Engine(target, None, max_batch=2), config) as url:
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        answer = client(url, key="s3cret").chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert answer.usage.completion_tokens >= 1
        assert httpx.get(f"{url}/health").status_code == 200


def test_text_only_target_refuses_images(tmp_path):
    target = Target.from_pretrained(save_tiny_model(tmp_path, "llama"), dtype=torch.float32)
    with running(Engine(target, None, max_batch=2), ServeConfig(model_name=MODEL)) as url:
        with pytest.raises(openai.BadRequestError, match="text-only"):
            client(url).chat.completions.create(model=MODEL, messages=user("hi", data_url(encode(noise(8, 8)))))


def test_disconnect_cancels_and_frees_the_slot(target, drafter):
    engine, handles = recording(Engine(target, drafter, TREE, max_batch=1))
    with running(engine, ServeConfig(model_name=MODEL)) as url:
        api = client(url)
        stream = api.chat.completions.create(model=MODEL, messages=user("talk for a long time"), max_tokens=1500,
                                             temperature=0, stream=True)
        received = [chunk for chunk, _ in zip(stream, range(3))]
        assert len(received) == 3
        stream.close()
        answer = api.chat.completions.create(model=MODEL, messages=user("next"), max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens >= 1
        with pytest.raises(RequestCancelled):            # it did not run to its 1500 tokens
            handles[0].result()
        # Not streamed: the client sends its request and hangs up; the server notices while the answer runs.
        body = json.dumps({"model": MODEL, "messages": user("talk again"), "max_tokens": 1500, "temperature": 0})
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            deadline = time.monotonic() + 60
            while len(handles) < 3 and time.monotonic() < deadline:     # wait until the server has submitted it
                time.sleep(0.01)
        # (result() is read only once the request is done: it waits on the sync queue, which aevents() took over)
        while not handles[2].done and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(RequestCancelled):
            handles[2].result()
        assert api.chat.completions.create(model=MODEL, messages=user("next"), max_tokens=4).usage.completion_tokens


def test_a_failed_engine_step_is_a_500_and_the_server_goes_on(target, monkeypatch):
    engine = Engine(target, None, max_batch=2)
    with running(engine, ServeConfig(model_name=MODEL)) as url:
        api = client(url)

        def boom():
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "_decode_step", boom)
        with pytest.raises(openai.InternalServerError, match="boom"):
            api.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=5)
        with pytest.raises(openai.APIError, match="boom"):              # streamed: the error comes in-band
            stream_answer(api, messages=user("hi"), max_tokens=5)
        monkeypatch.undo()
        assert api.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3).usage.completion_tokens
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vlmspec_requests_total{status="500"} 2.0' in metrics


def test_serve_cli_binds_loopback_and_exits_cleanly_on_sigterm(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny", "llava")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, "-m", "vlmspec.cli", "serve", "--target", str(folder), "--port", "0", "--dtype", "fp32",
               "--log-level", "warning", "--shutdown-grace", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        match = re.search(r"http://(127\.0\.0\.1):(\d+)", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(2)}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
                time.sleep(0.2)
        answer = client(url).chat.completions.create(model=str(folder), messages=user("hi"), max_tokens=3)
        assert answer.usage.completion_tokens >= 1
        # A long answer is streaming when SIGTERM comes: it is cut after the grace, and the exit is still clean.
        stream = client(url).chat.completions.create(model=str(folder), messages=user("talk"), max_tokens=1800,
                                                     temperature=0, stream=True)
        next(iter(stream))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_cli_refuses_a_taken_port_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = main(["serve", "--target", "/nonexistent/model", "--port", str(taken.getsockname()[1])])
    assert code == 2 and "cannot listen on 127.0.0.1" in capsys.readouterr().err
