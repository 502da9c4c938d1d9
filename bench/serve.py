"""Start one benchmark server on the settings `dreamserve serve` uses (`uvicorn_options`).

    python bench/serve.py dreamserve|admission|api|noop --port P --data-dir D
        [--database-url URL] [--no-shared] [--extra-users N]

- `dreamserve`: the real app, with a catalogue row `bench-tiny` (64x64 images) and a cap of
  100000 on its account, so that neither rendering nor capacity limits submissions; jobs run.
- `admission`: the same, but jobs are admitted and left `created` (a dispatcher that queues and
  never runs them): the submission path alone, and GETs of an unfinished job. Their lease is a
  day long: no runner ever claims them, and with the default 30 s the reaper would take back
  every job of the run half a minute after its admission (one write each, a third of the
  server's core at 1500 submissions a second), which no server with runners does.
- `api`: an API process of a scale-out deployment on PostgreSQL (`DREAMSERVE_RUN_JOBS=false`):
  jobs are admitted and enqueued through procrastinate (the default dispatcher), run by no one;
  a day-long lease, as `admission`. The submission path with its enqueue.
- `noop`: a FastAPI app whose POST parses the JSON body and whose GET answers a constant.

`--log-level info` writes the server's info lines (one per job event, observe.py) to stderr, as
`dreamserve serve` does by default; the default `warning` leaves them out.

`--database-url` puts the real app on that database (`Settings.database_url`; default: SQLite in
the data dir). `--no-shared` deletes the shared accounts the way the operator does (`dreamserve
accounts remove --shared`), so user 1 has only the accounts it creates itself through the API.

The first line on stdout is an API token (or `no-token`); with `--extra-users N`, N more lines
follow, each a token of a new user.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import update

from dreamserve.app import create_app, open_server
from dreamserve.catalogue import Catalogue, parse_catalogue
from dreamserve.cli import settle_heap, uvicorn_options
from dreamserve.dispatch.base import Runner
from dreamserve.dispatch.inprocess import InProcessDispatcher
from dreamserve.settings import Settings
from dreamserve.storage.tables import accounts


def bench_catalogue() -> Catalogue:
    return parse_catalogue(
        {
            "default_model": "bench-tiny",
            "ratios": ["1:1"],
            "sizes": {"tiny": {"1k": {"1:1": "64x64"}}},
            "models": [
                {"name": "bench-tiny", "resolutions": ["1k"], "sizes": "tiny", "max_refs": 1}
            ],
        }
    )


class QueueOnlyDispatcher:
    """Takes admitted jobs and runs none of them."""

    def __init__(self, runner: Runner) -> None:
        self.queued = 0

    async def dispatch(self, job_id: int, account: str | None = None) -> None:
        self.queued += 1

    def cancel(self, job_id: int) -> None:
        return None

    async def close(self) -> None:
        return None


def noop_app() -> FastAPI:
    app = FastAPI()

    @app.post("/noop")
    async def create(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"jobid": "noop", "status": "created", "request": body})

    @app.get("/noop/{jobid}")
    async def read(jobid: str) -> JSONResponse:
        return JSONResponse({"jobid": jobid, "status": "completed"})

    return app


async def prepare(settings: Settings, *, shared: bool = True, extra_users: int = 0) -> str:
    """User 1's token, then one line per extra user's."""
    async with open_server(settings) as server:
        service = server.service
        token = await service.tokens.bootstrap() or (await service.tokens.create(1))[1]
        for _ in range(extra_users):
            token += "\n" + (await service.tokens.create())[1]
        uncapped = update(accounts).values(max_jobs=100_000)
        await server.db.write(lambda conn: conn.execute(uncapped))
        if not shared:
            for name in await service.accounts.listing(None):
                await service.accounts.delete(None, name)
    return token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("app", choices=["dreamserve", "admission", "api", "noop"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--no-shared", action="store_true")
    parser.add_argument("--extra-users", type=int, default=0)
    parser.add_argument("--log-level", default="warning")  # info: the job event lines too
    args = parser.parse_args()
    unclaimed = {"lease_seconds": 86_400.0} if args.app in ("admission", "api") else {}
    settings = Settings(
        run_jobs=args.app != "api",
        data_dir=args.data_dir,
        database_url=args.database_url,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        **unclaimed,
    )
    if args.app == "noop":
        print("no-token", flush=True)
        app = noop_app()
    else:
        tokens = prepare(settings, shared=not args.no_shared, extra_users=args.extra_users)
        print(asyncio.run(tokens), flush=True)
        dispatchers = {"admission": QueueOnlyDispatcher, "api": None}
        dispatcher = dispatchers.get(args.app, InProcessDispatcher)
        app = create_app(settings, catalogue=bench_catalogue(), dispatcher=dispatcher)
    settle_heap()
    uvicorn.run(app, **uvicorn_options(settings))


if __name__ == "__main__":
    main()
