"""The `dreamserve` command: serve | migrate | tokens create | openapi.

Every command reads the same `DREAMSERVE_*` settings as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from dreamserve.app import API_PREFIX, create_app, open_service
from dreamserve.errors import DreamserveError
from dreamserve.service import AnotherRunner
from dreamserve.settings import Settings

SEED_REQUEST = {
    "prompt": "A stunning aurora borealis over a frozen lake at midnight",
    "model": "seedream-4.0",
    "ratio": "16:9",
    "resolution": "2k",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate, then run the API server")
    commands.add_parser("migrate", help="create or upgrade the database schema")
    commands.add_parser("openapi", help="print the OpenAPI document")
    tokens = commands.add_parser("tokens", help="manage API tokens").add_subparsers(
        dest="action", required=True
    )
    create = tokens.add_parser("create", help="print a new token (for a new user by default)")
    create.add_argument("--user", type=int, help="an existing user id")
    args = parser.parse_args(argv)

    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)  # it narrates every start
    try:
        if args.command == "serve":
            serve(settings)
        elif args.command == "migrate":
            asyncio.run(_migrate(settings))
            print(f"Database at {settings.database} is up to date")
        elif args.command == "openapi":
            print(json.dumps(create_app(settings).openapi(), indent=2, sort_keys=True))
        else:
            _, token = asyncio.run(_create_token(settings, args.user))
            print(token)
    except DreamserveError as error:
        print(f"dreamserve: {error.message}", file=sys.stderr)
        return 1
    except AnotherRunner as error:
        print(f"dreamserve: {error}", file=sys.stderr)
        return 1
    return 0


def serve(settings: Settings) -> None:
    import uvicorn

    token = asyncio.run(_bootstrap(settings))
    if token is not None:
        print(first_start_banner(settings, token), flush=True)
    uvicorn.run(create_app(settings), **uvicorn_options(settings))


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How `serve` runs uvicorn (the benchmarks run their servers the same way)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "proxy_headers": False,
    }


def first_start_banner(settings: Settings, token: str) -> str:
    url = f"{settings.base_url}{API_PREFIX}/images"
    curl = (
        f"curl -X POST {shlex.quote(url)} \\\n"
        f'    -H "Authorization: Bearer {token}" \\\n'
        '    -H "Content-Type: application/json" \\\n'
        f"    -d {shlex.quote(json.dumps(SEED_REQUEST))}"
    )
    return (
        f"dreamserve: first start of {settings.data_dir.resolve()}\n"
        "Created user 1 and the shared account LOCAL:procedural (the built-in procedural engine:\n"
        "abstract compositions computed from the prompt, no model).\n"
        f"API token for user 1 (shown only now; keep it): {token}\n"
        f"Try it:\n{curl}\n"
    )


async def _migrate(settings: Settings) -> None:
    async with open_service(settings):
        pass


async def _bootstrap(settings: Settings) -> str | None:
    async with open_service(settings) as service:
        if not await service.db.lock_runner():  # say so before uvicorn starts
            raise AnotherRunner
        return await service.bootstrap()


async def _create_token(settings: Settings, user_id: int | None) -> tuple[int, str]:
    async with open_service(settings) as service:
        return await service.create_token(user_id)


if __name__ == "__main__":
    sys.exit(main())
