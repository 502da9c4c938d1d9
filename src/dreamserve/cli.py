"""The `dreamserve` command: serve | worker | migrate | users list|create|set |
tokens create|list|revoke | accounts add|list|remove | openapi, and the client's
generate | jobs | upscale (dreamserve.client.cli).

Every command reads the same `DREAMSERVE_*` settings as the server. The `accounts` commands go
through the same service as the API and print its JSON replies; `--shared` acts as the operator.
Only `serve`, `migrate` and `worker` create a database: the others refuse to run where there is
none (a command run from another directory would otherwise start a second data dir there).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import json
import logging
import shlex
import signal
import socket
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from sqlalchemy.engine import URL, make_url

from dreamserve import __version__, metrics, observe
from dreamserve.app import (
    API_PREFIX,
    apply_config,
    create_app,
    finish_running,
    open_server,
    run_worker,
    stopping,
)
from dreamserve.client.cli import add_commands, ending_quietly
from dreamserve.config import ConfigError, load_config
from dreamserve.errors import DreamserveError
from dreamserve.replies import AccountDeleted, AccountSummary
from dreamserve.service import AnotherRunner
from dreamserve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

SEED_REQUEST = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "seedream-4.0",
    "ratio": "16:9",
    "resolution": "2k",
}


def main(argv: Sequence[str] | None = None) -> int:
    return ending_quietly(lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "client_command", None):  # generate, jobs, upscale: HTTP, no database
        return int(args.client_command(args))
    settings = Settings()
    observe.setup_logging(settings.log_level, settings.log_format)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # it narrates every start
    # httpx logs every request's URL at info: a replyUrl may hold a receiver's credentials.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        _run(settings, args)
    except DreamserveError as error:
        print(f"dreamserve: {error.message}", file=sys.stderr)
        return 1
    except (AnotherRunner, ConfigError) as error:
        print(f"dreamserve: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away: `main` ends quietly
        raise
    except OSError as error:  # a file or directory of the setup: a line, not a traceback
        print(f"dreamserve: {error}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dreamserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate, then run the API server")
    worker = commands.add_parser(
        "worker", help="run jobs admitted by API processes on the same PostgreSQL (no HTTP)"
    )
    worker.add_argument(
        "--accounts",
        metavar="A,B",
        help="the accounts whose jobs it runs, e.g. LOCAL:gpu0,LOCAL:gpu1 (default: every account "
        "whose engine loads here, those added later too)",
    )
    worker.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve its metrics on http://HOST:PORT/metrics (default DREAMSERVE_METRICS_PORT; "
        "none when 0)",
    )
    commands.add_parser("migrate", help="create or upgrade the database schema")
    commands.add_parser("openapi", help="print the OpenAPI document")
    tokens = commands.add_parser("tokens", help="manage API tokens").add_subparsers(
        dest="action", required=True
    )
    create = tokens.add_parser("create", help="print a new token (for a new user by default)")
    create.add_argument("--user", type=int, help="an existing user id")
    listed = tokens.add_parser("list", help="the tokens (id, prefix, times; never the secret)")
    listed.add_argument("--user", type=int, metavar="N", help="user N's tokens only")
    revoke = tokens.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("token", help="its id or prefix, as `tokens list` shows them")
    _users_parser(commands)
    _accounts_parser(commands)
    add_commands(commands)  # the client's: generate, jobs, upscale (docs/client.md)
    return parser


def _users_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser("users", help="manage users and their limits").add_subparsers(
        dest="action", required=True
    )
    users.add_parser("list", help="the users: tokens and limits, as JSON")
    users.add_parser("create", help="make a user; print its id and first token")
    limits = users.add_parser("set", help="set a user's limits ('none' removes one)")
    limits.add_argument("user", type=int, metavar="N", help="the user id")
    limits.add_argument(
        "--max-running",
        type=_limit,
        metavar="K",
        help="unfinished jobs at once, across all accounts (running, queued or waiting)",
    )
    limits.add_argument(
        "--max-per-minute", type=_limit, metavar="M", help="submissions per minute of the clock"
    )


_NONE = -1  # `none` on the command line: remove the limit


def _limit(text: str) -> int:
    if text.strip().lower() == "none":
        return _NONE
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 1 or more (or 'none')")
    return value


def _accounts_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    accounts = commands.add_parser(
        "accounts", help="manage generation accounts (as POST/GET/DELETE /accounts do)"
    ).add_subparsers(dest="action", required=True)
    add = accounts.add_parser("add", help="create or replace an account; print its summary")
    add.add_argument("account", help="the account id, REGION:name (e.g. LOCAL:gpu0)")
    # Not required here: the service's message for a missing engine lists the valid ones.
    add.add_argument("--engine", help="the engine that runs it (required), e.g. procedural")
    add.add_argument("--max-jobs", metavar="N", help="jobs it runs at once, 1-50 (default 10)")
    add.add_argument(
        "--priority",
        metavar="N",
        help="-1000 to 1000 (default 0): jobs go to the highest priority with a free slot",
    )
    add.add_argument("--models", metavar="A,B", help="models it serves (default: all it can)")
    add.add_argument("--email", help="its email (default: the name after the colon)")
    add.add_argument(
        "--setting",
        action="append",
        default=[],
        type=_setting,
        metavar="KEY=VALUE",
        help="an engine setting, repeatable; VALUE is read as JSON when it parses (8, true, "
        "{...}, '\"quoted\"'), else as text",
    )
    _owner_options(add)
    _owner_options(accounts.add_parser("list", help="print the accounts, keyed by id"))
    remove = accounts.add_parser("remove", help="delete an account, cancelling its jobs")
    remove.add_argument("account", help="the account id, REGION:name")
    _owner_options(remove)


def _owner_options(parser: argparse.ArgumentParser) -> None:
    whose = parser.add_mutually_exclusive_group()
    whose.add_argument(
        "--shared", action="store_true", help="the shared accounts, declared by the operator"
    )
    whose.add_argument(
        "--user", type=int, default=1, metavar="N", help="user N's accounts (default 1)"
    )


def _setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`, the value as JSON when it parses as JSON, else the text itself."""
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value, parse_constant=_not_a_number)
    except ValueError:
        return key, value


def _not_a_number(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON the API would take")  # NaN, Infinity: text


def _run(settings: Settings, args: argparse.Namespace) -> None:
    if args.command == "serve":
        serve(settings)
    elif args.command == "worker":
        accounts = [name for name in (args.accounts or "").split(",") if name.strip()]
        metrics.serve_alone(args.metrics_port or settings.metrics_port, settings.host)
        asyncio.run(_worker(settings, [name.strip() for name in accounts] or None))
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
        print(f"Database at {settings.database} is up to date")
    elif args.command == "openapi":
        print(json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True))
    else:
        require_database(settings)
        if args.command == "tokens" and args.action == "create":
            _, token = asyncio.run(_create_token(settings, args.user))
            print(token)
        elif args.command == "tokens" and args.action == "revoke":
            revoked = asyncio.run(_revoke(settings, args.token))
            print(json.dumps(revoked, indent=2))
            print(revoked_note(settings, revoked), file=sys.stderr)
        elif args.command in ("tokens", "users"):
            print(json.dumps(asyncio.run(_users(settings, args)), indent=2))
        else:
            print(json.dumps(asyncio.run(_accounts(settings, args)), indent=2))


def serve(settings: Settings) -> None:
    import uvicorn

    token, placeholder, routing = asyncio.run(_bootstrap(settings))
    if token is not None:
        print(first_start_banner(settings, token, placeholder), flush=True)
    print("\n".join(routing), flush=True)
    app = create_app(settings)
    settle_heap()
    config = uvicorn.Config(app, **uvicorn_options(settings))
    _stopping_server(app, config, settings.stop_grace_seconds).run()


def _stopping_server(app: FastAPI, config: Any, grace: float = 0.0) -> Any:
    """uvicorn's server, telling the app as soon as a shutdown begins (`stopping`: submissions
    refused, `?wait=` requests and event streams answered at once, which would otherwise hold
    the shutdown until their job ended), then, still listening, letting the running jobs end
    for up to `grace` seconds (`finish_running`; a second Ctrl-C cuts it short) before
    uvicorn's own shutdown: it stops listening, waits up to `timeout_graceful_shutdown` for
    the open requests, and runs the lifespan's exit (which stops the jobs left)."""
    import uvicorn

    class StoppingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping(app)
            finishing = asyncio.create_task(finish_running(app, grace))
            while not finishing.done() and not self.force_exit:
                await asyncio.wait({finishing}, timeout=0.1)
            if not finishing.done():
                finishing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await finishing
            await super().shutdown(sockets)

    return StoppingServer(config)


def settle_heap() -> None:
    """Tune the garbage collector for a long-lived server, once its modules and app are built.

    The objects made so far (modules, routes, schemas: ~140,000) live as long as the process,
    yet each full collection walked them all again, and collections of the youngest objects
    came every few requests: 4 % of the server's CPU under load (docs/benchmarks.md). They are
    frozen out of the collector's sight, and young collections wait for more allocations.
    Reference counting frees almost everything a request makes; the collector is only for
    cycles."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `serve` runs uvicorn (the benchmarks run their servers the same way)."""
    from dreamserve.httplimits import head_limits  # uvicorn and httptools: `serve` only

    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "log_config": log_config(settings.log_format),
        "proxy_headers": False,
        # httptools as uvicorn would pick it, with bounds on a request head's size and time, a
        # body's time and open connections, which uvicorn does not have (httplimits.py).
        "http": head_limits(
            settings.max_header_bytes,
            settings.header_timeout_seconds,
            settings.max_connections,
            settings.body_timeout_seconds,
        ),
        # Requests still running then are cancelled: a shutdown is bounded whatever they wait on.
        "timeout_graceful_shutdown": settings.shutdown_seconds,
    }


def log_config(log_format: str = "text") -> dict[str, Any]:
    """uvicorn's own logging configuration, with `QuietProbes` and `UnsignedLinks` on its
    access log; its lines as JSON with `json` (observe.JsonFormatter)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {
        "quiet_probes": {"()": QuietProbes},
        "unsigned_links": {"()": UnsignedLinks},
    }
    config["loggers"]["uvicorn.access"]["filters"] = ["quiet_probes", "unsigned_links"]
    if log_format == "json":
        for name in config["formatters"]:
            config["formatters"][name] = {"()": observe.JsonFormatter}
    return config


PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # and Prometheus's scrapes


class QuietProbes(logging.Filter):
    """Leaves the health probes (GET /healthz, /readyz, every few seconds from a load balancer
    or an orchestrator) and Prometheus's scrapes (GET /metrics) out of uvicorn's access log;
    /readyz logs its failing checks itself, once per change (service/readiness.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            return args[2].partition("?")[0] not in PROBE_PATHS
        return True


class UnsignedLinks(logging.Filter):
    """Takes the `signature` parameter out of the request lines of uvicorn's access log: a
    logged file link would otherwise fetch its image, for anyone who reads the log, until it
    expires. uvicorn logs a request with the arguments (client, method, path with query, HTTP
    version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], without_signature(args[2]), *args[3:])
        return True


def without_signature(target: str) -> str:
    """A request target without its `signature` query parameters (however their name is
    percent-encoded: the server decodes it), the other parameters kept in order."""
    path, question, query = target.partition("?")
    if not question:
        return target
    kept = [
        part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != "signature"
    ]
    return f"{path}?{'&'.join(kept)}" if kept else path


def first_start_banner(settings: Settings, token: str, placeholder: bool = True) -> str:
    url = f"{settings.base_url}{API_PREFIX}/images"
    curl = (
        f"curl -X POST {shlex.quote(url)} \\\n"
        f'    -H "Authorization: Bearer {token}" \\\n'
        '    -H "Content-Type: application/json" \\\n'
        f"    -d {shlex.quote(json.dumps(SEED_REQUEST))}"
    )
    made = (
        "Created user 1 and the shared account LOCAL:procedural (the built-in procedural engine:\n"
        "abstract compositions computed from the prompt, no model).\n"
        if placeholder
        else "Created user 1 (the configuration file declares the accounts).\n"
    )
    return (
        f"dreamserve: first start of {settings.data_dir.resolve()}\n"
        f"{made}"
        f"API token for user 1 (shown only now; keep it): {token}\n"
        f"Try it:\n{curl}\n"
    )


async def _worker(settings: Settings, accounts: list[str] | None) -> None:
    """Run jobs until SIGTERM or SIGINT, then stop their engines (they run again elsewhere)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run_worker(settings, accounts, stop)


async def _migrate(settings: Settings) -> None:
    async with open_server(settings):
        pass


NO_TOKEN = (
    "dreamserve: user 1 has no API token (none was ever made for it); make one with: "
    "dreamserve tokens create --user 1"
)


LOCAL_LINKS = (
    "dreamserve: listening on every interface, but the links in job records (the images) point "
    "at {url}, which other machines cannot open: set DREAMSERVE_PUBLIC_URL to the address they "
    "use (http://<this machine>:{port})"
)


async def _bootstrap(settings: Settings) -> tuple[str | None, bool, list[str]]:
    """The first start's token (None on later starts), whether the first start made the
    placeholder account (only when the configuration file declares none) and the routing
    lines (`Accounts.routing`), led by NO_TOKEN when user 1 exists but was never given a
    token. User 1 and its token are made only once the file's shared accounts were applied: a
    bad one stops the start before them, so that no token is made that nobody was shown. The
    file's accounts of users (`user = 1` included) are applied after; when one of those stops
    a first start, its token is shown first. Errors here stop `serve` before uvicorn starts."""
    config = load_config(settings.config)
    placeholder = not config.accounts
    async with open_server(settings, catalogue=config.catalogue) as server:
        # Say so before uvicorn starts (on PostgreSQL, any number of servers run jobs).
        if not await server.db.lock_runner() and not server.db.shared:
            raise AnotherRunner
        await apply_config(server.service, config, shared=True)
        token = await server.service.tokens.bootstrap(placeholder)
        try:
            await apply_config(server.service, config, shared=False)
        except ConfigError:
            if token is not None:  # user 1 exists now: its token is shown, or lost for good
                print(first_start_banner(settings, token, placeholder), file=sys.stderr)
            raise
        routing = await server.service.accounts.routing()
        if token is None and await server.service.tokens.without_token():
            routing.insert(0, NO_TOKEN)
        if settings.listens_everywhere and not settings.public_url:
            routing.insert(0, LOCAL_LINKS.format(url=settings.base_url, port=settings.port))
        return token, placeholder, routing


def _placeholder(settings: Settings) -> bool:
    """Whether a first start makes the placeholder account LOCAL:procedural: only when the
    operator's configuration file declares no accounts."""
    return not load_config(settings.config).accounts


async def _create_token(settings: Settings, user_id: int | None) -> tuple[int, str]:
    async with open_server(settings) as server:
        service = server.service
        if user_id is None:
            # On an empty database the new user is the first start's user 1, made with the
            # shared LOCAL:procedural account as `serve` would (which then makes neither).
            token = await service.tokens.bootstrap(_placeholder(settings))
            if token is not None:
                return 1, token
        return await service.tokens.create(user_id)


async def _users(settings: Settings, args: argparse.Namespace) -> Any:
    """`users list|create|set` and `tokens list`: JSON for stdout."""
    async with open_server(settings) as server:
        tokens = server.service.tokens
        if args.command == "tokens":
            return await tokens.listing(args.user)
        if args.action == "list":
            return await tokens.users()
        if args.action == "create":
            user_id, token = await tokens.create(None)
            return {"id": user_id, "token": token}
        given = {"max_running": args.max_running, "max_per_minute": args.max_per_minute}
        values = {
            name: (None if value == _NONE else value)
            for name, value in given.items()
            if value is not None
        }
        return await tokens.set_limits(args.user, values)


async def _revoke(settings: Settings, name: str) -> dict[str, Any]:
    async with open_server(settings) as server:
        return await server.service.tokens.revoke(name)


def revoked_note(settings: Settings, revoked: dict[str, Any]) -> str:
    """What `tokens revoke` says on stderr: how soon servers refuse the token."""
    seconds = f"{settings.token_cache_seconds:g}"
    return (
        f"dreamserve: token {revoked['id']} ({revoked['prefix']}...) revoked; running servers "
        f"refuse it within {seconds} s (their token cache, DREAMSERVE_TOKEN_CACHE_SECONDS)"
    )


def require_database(settings: Settings) -> None:
    """Raise NoDatabase unless the settings' database exists and holds dreamserve's schema
    (an `alembic_version` table); nothing is created either way."""
    url = make_url(settings.database)
    if url.get_backend_name() == "postgresql":
        import psycopg

        bare = URL.create(url.drivername, url.username, None, url.host, url.port, url.database)
        shown = bare.render_as_string(hide_password=False)  # no password, nor query
        plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
        try:
            with psycopg.connect(plain, connect_timeout=10) as conn:
                found = conn.execute("SELECT to_regclass('alembic_version')").fetchone()
        except psycopg.Error:
            return  # unreachable: opening it says why, as for `serve`
        if found is None or found[0] is None:
            raise NoDatabase(shown)
        return
    path = Path(url.database or "").absolute()
    if not path.is_file():
        raise NoDatabase(str(path))
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alembic_version'"
            ).fetchone()
    except sqlite3.Error:
        return  # not a database: opening it says so, as for `serve`
    if found is None:
        raise NoDatabase(str(path))


class NoDatabase(DreamserveError):
    def __init__(self, where: str) -> None:
        super().__init__(
            f"No dreamserve database at {where}; set DREAMSERVE_DATA_DIR or run dreamserve "
            "serve there"
        )


async def _accounts(
    settings: Settings, args: argparse.Namespace
) -> AccountSummary | dict[str, AccountSummary] | AccountDeleted:
    """`accounts add|list|remove`: the service's reply; `--shared` is the operator (None)."""
    async with open_server(settings) as server:
        service = server.service
        # An empty database gets its first start here as it would from `serve`: `--user 1` (the
        # default) and LOCAL:procedural then mean the same before and after the server first
        # runs, and `serve` will not make them again. The token shows once, on stderr (stdout
        # stays JSON).
        placeholder = _placeholder(settings)
        token = await service.tokens.bootstrap(placeholder)
        if token is not None:
            print(first_start_banner(settings, token, placeholder), file=sys.stderr, flush=True)
        owner = None if args.shared else args.user
        if args.action == "add":
            return await service.accounts.put(owner, _account_fields(args))
        if args.action == "list":
            return await service.accounts.listing(owner)
        return await service.accounts.delete(owner, args.account)


def _account_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /accounts body the options stand for; options not given are left out."""
    fields: dict[str, Any] = {"account": args.account, "settings": dict(args.setting)}
    given = {
        "engine": args.engine,
        "maxJobs": args.max_jobs,  # as text: the service's check names the valid range
        "priority": args.priority,
        "models": args.models,  # "a,b": the service splits it as it does a form's
        "email": args.email,
    }
    fields.update({key: value for key, value in given.items() if value is not None})
    return fields


if __name__ == "__main__":
    sys.exit(main())
