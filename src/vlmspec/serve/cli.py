"""`vlmspec serve`: load the target and drafter, start the batched engine, and serve the app with uvicorn.

The socket is bound before the model loads, so a taken port fails fast with one line. SIGTERM (or Ctrl-C) stops
admitting at once (new connections are refused, /health says draining), lets running answers finish for
`--shutdown-grace` seconds, cancels the rest, stops the engine and exits with status 0 (Ctrl-C: 130)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from vlmspec.serve.config import MIB, ImageLimits, ServeConfig

API_KEY_ENV = "VLMSPEC_API_KEY"


def add_parser(sub) -> None:
    from vlmspec.cli import add_model_arguments

    parser = sub.add_parser("serve", help="an OpenAI-compatible server (chat completions, streaming, images)",
                            description="Serve the target with speculative decoding behind the OpenAI "
                                        "chat-completions API, a Prometheus /metrics and a web page at /. "
                                        "Binds 127.0.0.1 unless told otherwise; never fetches image URLs.")
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server, "
                             "so set an API key)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed at start)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else none)")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and /v1/models lists (default: --target as given)")
    parser.add_argument("--allowed-local-media-path", default=None, metavar="ROOT",
                        help="serve image_url file:// URLs and paths under ROOT (resolved: no escape by .. or "
                             "symlinks); default: no local files")
    parser.add_argument("--max-concurrency", type=int, default=16, help="requests decoded at once (engine rows)")
    parser.add_argument("--max-waiting", type=int, default=256, help="requests queued beyond those (more: 503)")
    parser.add_argument("--max-images", type=int, default=8, help="image parts per request")
    parser.add_argument("--max-image-bytes", type=int, default=10 * MIB, help="encoded bytes per image")
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height per image")
    parser.add_argument("--max-body-bytes", type=int, default=32 * MIB, help="request body size")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="seconds running answers may finish after SIGTERM before they are cancelled")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from vlmspec.serve.app import create_app
    except ImportError as error:
        raise ValueError(f"vlmspec serve needs the serve extra (pip install 'vlmspec[serve]'): {error}") from None
    from vlmspec.runtime import open_generator

    # Everything cheap is checked, and the port taken, before the model loads.
    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    limits = ImageLimits(max_images=args.max_images, max_image_bytes=args.max_image_bytes,
                         max_pixels=args.max_image_pixels,
                         allowed_local_media_path=args.allowed_local_media_path)
    config = ServeConfig(model_name=args.served_model_name or args.target, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes, max_waiting=args.max_waiting,
                         shutdown_grace_seconds=args.shutdown_grace, images=limits)
    sock = bind(args.host, args.port)
    if not is_loopback(args.host) and config.api_key is None:
        print(f"vlmspec serve: warning: listening on {args.host} without an API key: anyone who can reach this "
              f"port can use the model", file=sys.stderr)
    engine = open_generator(args.target, args.drafter, args.tree, args.dtype, args.drafter_option).engine(
        max_batch=args.max_concurrency)
    server: uvicorn.Server | None = None
    app = create_app(engine, config, draining=lambda: server is not None and server.should_exit)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level,
                                           timeout_graceful_shutdown=int(args.shutdown_grace) + 5))
    host, port = sock.getsockname()[:2]
    print(f"vlmspec serve: model {config.model_name!r} (drafter {args.drafter}) on http://{host}:{port}",
          file=sys.stderr, flush=True)
    # uvicorn re-raises the SIGTERM it handled once it has shut down; this handler takes it, so a stop by
    # SIGTERM exits 0 instead of dying of the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock
