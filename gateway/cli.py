"""`gateway serve | check | keys new`: the only module that prints or exits."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn

from gateway.config import Config, ConfigError, load_config
from gateway.config.keys import append_key, new_secret
from gateway.config.settings import OPTIONS, Option, Settings, SettingsError, from_env


class _Parser(argparse.ArgumentParser):
    """A usage error in one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"gateway: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gateway", description="OpenAI-compatible LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    flags = {o.name: o for o in OPTIONS}

    def add(p: argparse.ArgumentParser, option: Option) -> None:
        # Values stay strings here: settings.from_env checks them against their row,
        # so a flag and its variable are refused with the same words.
        dest, text, name = option.name, option.help, option.flag[2:].upper()
        if option.kind == "switch":
            p.add_argument(option.flag, dest=dest, action="store_const", const=True, help=text)
        elif option.kind == "repeat":
            p.add_argument(option.flag, dest=dest, action="append", metavar=name, help=text)
        else:
            p.add_argument(option.flag, dest=dest, metavar=name, help=text)

    serve = sub.add_parser("serve", help="run the proxy")
    for option in OPTIONS:
        add(serve, option)
    check = sub.add_parser("check", help="validate routes and keys files")
    add(check, flags["routes_path"])
    add(check, flags["keys_path"])
    keys = sub.add_parser("keys", help="manage access keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="create a key; prints the secret once")
    new.add_argument("name")
    add(new, flags["keys_path"])
    return parser


def _fail(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr)
    return 1


def _settings(args: argparse.Namespace) -> Settings:
    return from_env(**{o.name: getattr(args, o.name, None) for o in OPTIONS})


def _load(settings: Settings) -> Config | None:
    try:
        return load_config(settings.routes_path, settings.keys_path, settings.keys_explicit)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def cmd_check(settings: Settings) -> int:
    config = _load(settings)
    if config is None:
        return 1
    routes = config.routes
    keys = len(config.keys.entries)
    print(
        f"{settings.routes_path}: {len(routes.providers)} providers, "
        f"{len(routes.models)} models, {len(routes.wildcards)} wildcard patterns"
    )
    print(f"{settings.keys_path}: {keys} keys" + ("" if keys else " (no auth: loopback only)"))
    print(f"config version {config.version}: OK")
    return 0


def cmd_keys_new(name: str, settings: Settings) -> int:
    path = Path(settings.keys_path)
    secret = new_secret()
    try:
        append_key(path, name, secret)
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {path}: {exc.strerror}")
    print(secret)
    print(
        f"gateway: key {name!r} added to {path}; the secret is shown only this once",
        file=sys.stderr,
    )
    return 0


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every small response waits for a delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host.strip("[]"), settings.port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def cmd_serve(settings: Settings) -> int:
    import uvicorn

    from gateway.server.protocol import ServerProtocol
    from gateway.telemetry.accesslog import configure as configure_access_log

    configure_access_log(settings.log_level)
    _raise_open_file_limit()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    config = _load(settings)
    if config is None:
        return 1
    if settings.redis and importlib.util.find_spec("redis") is None:
        return _fail(
            f"--state {settings.state.split('://')[0]}:// needs the Redis client: "
            "pip install redis hiredis (from a checkout: pip install -e '.[redis]')"
        )
    if config.keys.open and not settings.loopback:
        return _fail(
            f"refusing to listen on {settings.host} with no access keys configured; "
            "create one with `gateway keys new NAME` or bind 127.0.0.1"
        )
    try:
        sock = _bind(settings)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(
                f"port {settings.port} on {settings.host} is already in use; stop the other process or pass --port"
            )
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")
    common: dict[str, Any] = {
        "lifespan": "on",
        "log_level": settings.log_level,
        "access_log": False,
        "server_header": False,
        "date_header": False,
        # The gateway reads no client address; uvicorn's X-Forwarded-For parsing would
        # only cost time on every request.
        "proxy_headers": False,
        "timeout_graceful_shutdown": settings.drain_seconds,
        # Our HTTP/1.1 protocol (server.protocol.ServerProtocol) in place of uvicorn's httptools one.
        "http": ServerProtocol,
        # Gateway.__call__ returns its endpoint's coroutine instead of being one, which
        # uvicorn's guess would take for ASGI 2.
        "interface": "asgi3",
        "loop": "uvloop",
    }
    from gateway.app import Gateway, create_app, settle_heap
    from gateway.state.file import StateError

    # The state is read and its path proved writable before "serving" is said: a path
    # no sync could write would lose every second's spend, logging as it went.
    app: Gateway | None = None
    try:
        if settings.workers > 1:
            _check_state(settings)
        else:
            app = create_app(settings, config)
            if app.state.state is not None:
                app.state.state.check_writable()
    except StateError as exc:
        sock.close()
        return _fail(str(exc))
    if config.keys.open:  # said once nothing else refuses the start: a refusal is one line
        print(
            "gateway: warning: no access keys configured; anyone on this machine can use the gateway",
            file=sys.stderr,
        )
    print(
        f"gateway: serving {len(config.routes.models) + len(config.routes.wildcards)} models on "
        f"http://{settings.host}:{sock.getsockname()[1]}/v1 (config {config.version})",
        file=sys.stderr,
    )
    # uvicorn re-raises the signal it drained on once it is done; with these no-op
    # handlers in place that re-raise returns here, and a drained SIGTERM exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if settings.workers > 1:
        import gc
        import tempfile

        # The supervisor only checked the files: each worker loads its own config, so
        # this one is not kept for the supervisor's whole life (73 MiB at 10k models).
        del config
        gc.collect()

        from uvicorn.supervisors import Multiprocess

        _export(settings)
        # Workers share metric values through files here; removed when the supervisor ends.
        metrics_dir = tempfile.TemporaryDirectory(prefix="gateway-metrics-")
        os.environ.setdefault("GATEWAY_METRICS_DIR", metrics_dir.name)
        uv_config = uvicorn.Config(
            "gateway.app:app_from_env", factory=True, workers=settings.workers, **common
        )
        Multiprocess(uv_config, sockets=[sock]).run()
        return 0
    assert app is not None
    uv_config = uvicorn.Config(app, **common)
    settle_heap()
    uvicorn.Server(uv_config).run(sockets=[sock])
    return 0


def _check_state(settings: Settings) -> None:
    """With --workers N: the state file read (a corrupt one set aside) and its path
    proved writable once here, not raced by every worker. Raises StateError."""
    if settings.state == "none" or settings.redis:
        return
    from gateway.limits import Limiter
    from gateway.state.file import StateFile

    state = StateFile(settings.state, Limiter())
    state.load()
    state.check_writable()


def _raise_open_file_limit() -> None:
    """The soft open-file limit up to the hard one, as nginx's worker_rlimit_nofile and
    Go's runtime do: the connection cap is derived from it (default_max_connections)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _export(settings: Settings) -> None:
    """Worker processes rebuild their settings from the environment."""
    os.environ.update(
        GATEWAY_ROUTES=settings.routes_path,
        GATEWAY_KEYS=settings.keys_path,
        GATEWAY_HOST=settings.host,
        GATEWAY_PORT=str(settings.port),
        GATEWAY_MAX_BODY_BYTES=str(settings.max_body_bytes),
        GATEWAY_DRAIN_SECONDS=str(settings.drain_seconds),
        GATEWAY_LOG_LEVEL=settings.log_level,
        GATEWAY_LOG_FORMAT=settings.log_format,
        GATEWAY_MAX_HEADER_BYTES=str(settings.max_header_bytes),
        GATEWAY_HEADER_TIMEOUT=str(settings.header_timeout),
        GATEWAY_BODY_TIMEOUT=str(settings.body_timeout),
        GATEWAY_MAX_CONNECTIONS=str(settings.max_connections),
        GATEWAY_MAX_RESPONSE_BYTES=str(settings.max_response_bytes),
        GATEWAY_MAX_EVENT_BYTES=str(settings.max_event_bytes),
        # Every worker syncs its spend into the one file (state.file.StateFile).
        GATEWAY_STATE=settings.state
        if settings.state == "none" or settings.redis
        else str(Path(settings.state).resolve()),
        GATEWAY_STATE_FAIL=settings.state_fail,
        GATEWAY_ALLOW_HOSTS=",".join(settings.allow_hosts),
        GATEWAY_CORS_ORIGINS=",".join(settings.cors_origins),
        GATEWAY_METRICS_ADMIN="true" if settings.metrics_admin else "false",
        GATEWAY_RESPONSE_IDS_PER_KEY=str(settings.response_ids_per_key),
    )
    if not settings.keys_explicit:
        os.environ.pop("GATEWAY_KEYS")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        for problem in exc.problems:
            _fail(problem)
        return 1
    if args.command == "check":
        return cmd_check(settings)
    if args.command == "keys":
        return cmd_keys_new(args.name, settings)
    return cmd_serve(settings)


if __name__ == "__main__":
    sys.exit(main())
