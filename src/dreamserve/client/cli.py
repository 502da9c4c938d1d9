"""The client's commands of `dreamserve`: `generate`, `jobs [--watch]` and `upscale`. They talk
to a server over HTTP through `dreamserve.client` (`--server` / `DREAMSERVE_URL`, `--token` /
`DREAMSERVE_TOKEN`), so they need none of the server's dependencies and never open a database.

Results go to stdout (the saved images' paths, one per line; the jobs), everything else (progress,
notes, errors as `dreamserve: <the server's message>`) to stderr. Exit status: 0, 1 on an error,
130 after Ctrl-C (which cancels the job `generate` or `upscale` is following).
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from dreamserve import __version__
from dreamserve.client.errors import (
    ApiError,
    ClientError,
    ConnectionFailed,
    JobFailed,
    WaitTimedOut,
)
from dreamserve.client.sync import Client

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from dreamserve.replies import AccountSummary, JobRecord

COMMANDS = ("generate", "jobs", "upscale")
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
# A command whose reader went away (`dreamserve jobs | head -1`) ends with the status of a
# process that SIGPIPE ends, as other commands in a pipe do, and without a traceback.
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE
SERVER_COMMANDS = "serve, worker, migrate, users, tokens, accounts, openapi"


def main(argv: Sequence[str], server_missing: str | None = None) -> int:
    """`dreamserve` with the client's commands alone. `dreamserve.__main__` runs these here
    before anything of the server is imported; where the server is not installed
    (`server_missing`: the module found missing), every command line comes here, and the help
    says how to install the rest."""
    parser = argparse.ArgumentParser(
        prog="dreamserve",
        description=__doc__,
        epilog=None
        if server_missing is None
        else f"The server's commands ({SERVER_COMMANDS}) need the server, which is not installed "
        f"here ({server_missing} is missing): pip install 'dreamserve[server]'",
    )
    parser.add_argument("--version", action="version", version=f"dreamserve {__version__}")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return ending_quietly(lambda: run(parser.parse_args(argv)))


def ending_quietly(command: Callable[[], int]) -> int:
    """Run a command; where its output's reader went away, end as `BROKEN_PIPE_STATUS`."""
    try:
        status = command()
        sys.stdout.flush()  # here, not at exit: a closed reader is seen while it is caught
    except BrokenPipeError:
        # Python's "Note on SIGPIPE": stdout pointed at /dev/null, so that the interpreter's
        # own flush at exit finds nothing to write to the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return BROKEN_PIPE_STATUS
    return status


RATIOS = ("auto", "1:1", "3:4", "16:9", "4:3", "9:16", "2:3", "3:2", "21:9")
STATUSES = ("created", "completed", "failed")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `generate`, `jobs` and `upscale` to the `dreamserve` command's subparsers; each
    sets `client_command` (this module's `run`) in the parsed arguments."""
    generate = commands.add_parser(
        "generate",
        help="generate images on a server: upload references, submit, show progress, download",
        description="Submit an image job to a dreamserve server (or the hosted API), follow its "
        "progress, download its images into --out and print their paths. Ctrl-C cancels it.",
    )
    generate.add_argument(
        "prompt", nargs="?", help="the prompt (optional with --ref on some models)"
    )
    generate.add_argument("--model", help="a model of GET /models (default: the server's)")
    generate.add_argument("--ratio", choices=RATIOS, help="default: auto where the model has it")
    generate.add_argument("--resolution", choices=("1k", "2k", "4k"), help="default: the model's")
    generate.add_argument("--count", type=int, help="images, 1-4 (default 4)")
    generate.add_argument("--seed", type=int, help="default: one picked at random")
    generate.add_argument(
        "--ref",
        dest="refs",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="reference images (JPEG, PNG, WebP), uploaded to the job's account",
    )
    generate.add_argument(
        "--strength", type=float, help="how much the references shape the result, 0-1"
    )
    generate.add_argument(
        "--account",
        help="the account to run on (default: the server picks; with --ref, the highest "
        "priority account that serves the model and has a free slot)",
    )
    generate.add_argument(
        "--queue", type=int, metavar="SECONDS", help="wait up to this long for a free slot"
    )
    _output(generate)
    _connection(generate)

    jobs = commands.add_parser(
        "jobs",
        help="list your jobs on a server, newest first",
        description="Your jobs, newest first: a table on a terminal, tab-separated lines "
        "(jobid, type, model, status, created, progress or error) otherwise.",
    )
    jobs.add_argument("--status", choices=STATUSES)
    jobs.add_argument("--model")
    jobs.add_argument("--account")
    jobs.add_argument("--limit", type=_positive(int), default=20, help="how many (default 20)")
    jobs.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    jobs.add_argument(
        "--interval",
        type=_positive(float),
        default=2.0,
        metavar="SECONDS",
        help="--watch's refresh",
    )
    _connection(jobs)

    upscale = commands.add_parser(
        "upscale",
        help="upscale an image of a completed job; download it",
        description="Upscale one image of a completed job, follow its progress, download the "
        "result into --out and print its path. Ctrl-C cancels it.",
    )
    upscale.add_argument("jobid", help="a completed image job of yours")
    upscale.add_argument("--index", type=int, help="which of its images, from 0 (default 0)")
    upscale.add_argument("--resolution", choices=("2k", "4k", "8k"), help="default 4k")
    _output(upscale)
    _connection(upscale)
    for parser in (generate, jobs, upscale):
        parser.set_defaults(client_command=run)  # `dreamserve` runs these before any Settings


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number above 0, else argparse's usage error (not a traceback)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help="the server's root (default DREAMSERVE_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument("--token", help="the API token (default DREAMSERVE_TOKEN)")


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="where to save (default .)"
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after this long"
    )


def run(args: argparse.Namespace) -> int:
    """Run a command `add_commands` added; its exit status."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        if args.command in ("generate", "upscale"):
            args.out.mkdir(parents=True, exist_ok=True)  # before a job is made for nothing
        with Client(args.server, args.token) as client:
            if args.command == "generate":
                return _generate(client, args, err)
            if args.command == "upscale":
                return _upscale(client, args, err)
            return _jobs(client, args)
    except JobFailed as failed:
        details = f" ({failed.details})" if failed.details else ""
        print(f"dreamserve: job {failed.jobid} failed: {failed.error}{details}", file=sys.stderr)
    except ClientError as error:
        print(f"dreamserve: {error}", file=sys.stderr)
    except BrokenPipeError:
        raise  # stdout's reader went away: `ending_quietly` ends the command as a pipe would
    except OSError as error:  # a reference or an output file
        print(f"dreamserve: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        return INTERRUPTED
    return 1


def _generate(client: Client, args: argparse.Namespace, err: Console) -> int:
    refs = []
    account = args.account
    for file in args.refs:
        if account is None:
            account = _reference_account(client, args.model)
        uploaded = client.upload(account, Path(file))
        _note(err, f"uploaded {file} to {uploaded['account']}")
        refs.append(uploaded["assetRef"])
    key = str(uuid.uuid4())
    return _finish(
        client,
        lambda: client.submit(
            args.prompt,
            model=args.model,
            ratio=args.ratio,
            resolution=args.resolution,
            count=args.count,
            seed=args.seed,
            refs=refs,
            image_strength=args.strength,
            account=account,
            queue_seconds=args.queue,
            idempotency_key=key,
        ),
        args,
        err,
        "generating",
    )


def _upscale(client: Client, args: argparse.Namespace, err: Console) -> int:
    key = str(uuid.uuid4())
    return _finish(
        client,
        lambda: client.upscale(
            args.jobid, args.index, resolution=args.resolution, idempotency_key=key
        ),
        args,
        err,
        "upscaling",
    )


def _finish(
    client: Client,
    submit: Callable[[], JobRecord],
    args: argparse.Namespace,
    err: Console,
    doing: str,
) -> int:
    """Submit, follow the job with a progress bar (Ctrl-C cancels it), then save its images and
    print their paths. `submit` sends the same Idempotency-Key every time: a Ctrl-C while the
    submission is under way (the server may have made the job already) sends it once more, which
    answers with that job (or makes it, where the first try never arrived), and cancels it."""
    try:
        record = submit()
    except KeyboardInterrupt:
        try:
            made = submit()
        except ApiError:  # refused (all accounts busy, say): no job was made, none to cancel
            return INTERRUPTED
        _cancel(client, made["jobid"])
        return INTERRUPTED
    jobid = record["jobid"]
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    try:
        _note(err, f"job {jobid}")
        _follow(client, record, err, doing, deadline)
        final = _wait(client, jobid, args.timeout, deadline)
    except KeyboardInterrupt:
        _cancel(client, jobid)
        return INTERRUPTED
    for image in final["response"].get("images", []):
        print(client.download(image, args.out), flush=True)
    return 0


def _note(err: Console, text: str) -> None:
    """A line on stderr as it is: no markup (a file name may hold `[...]`), no wrapping."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _follow(
    client: Client, record: JobRecord, err: Console, doing: str, deadline: float | None
) -> None:
    """A progress bar fed by the job's event stream, until the job ends (or the stream does:
    a server that stops, or one without event streams, such as the hosted API), or until
    `deadline` (`time.monotonic()`; --timeout) passes. The stream is read in a thread: a job
    whose progress does not change sends nothing for as long as it runs, and the deadline and
    Ctrl-C must not wait for it."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    columns = (
        TextColumn(doing),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[state]}"),
    )
    updates: queue.Queue[JobRecord | _Ended] = queue.Queue()
    reader = threading.Thread(target=_read_events, args=(client, record["jobid"], updates))
    reader.daemon = True  # one blocked on a quiet stream never holds the command's exit
    reader.start()
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(doing, total=100, state=_state(record))
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                update = updates.get(timeout=None if left is None else max(0.0, left))
            except queue.Empty:
                return  # --timeout: `wait` says the job still runs
            if isinstance(update, _Ended):
                if update.error is not None:
                    raise update.error
                return
            done = 100 if update["status"] == "completed" else update.get("progress", 0)
            progress.update(task, completed=done, state=_state(update))


@dataclass(frozen=True)
class _Ended:
    """The end of an event stream: None, or the error to raise in the command."""

    error: Exception | None = None


def _read_events(client: Client, jobid: str, updates: queue.Queue[JobRecord | _Ended]) -> None:
    try:
        for update in client.events(jobid):
            updates.put(update)
    except ApiError:
        pass  # no event stream there (the hosted API has none): `wait` polls
    except ConnectionFailed:
        pass  # the stream broke (a proxy, a restart): the job goes on; `wait` polls
    except Exception as error:  # raised in the command, as it was before the thread
        updates.put(_Ended(error))
        return
    updates.put(_Ended())


def _wait(client: Client, jobid: str, timeout: float | None, deadline: float | None) -> JobRecord:
    """The job's final record, within what is left of --timeout (`WaitTimedOut` names it)."""
    if timeout is None or deadline is None:
        return client.wait(jobid)
    try:
        return client.wait(jobid, max(0.0, deadline - time.monotonic()))
    except WaitTimedOut as error:
        raise WaitTimedOut(error.record, timeout) from None


def _state(record: JobRecord) -> str:
    if record["status"] == "completed":
        count = len(record["response"].get("images", []))
        return f"completed, {count} image{'s' if count != 1 else ''}"
    if record["status"] == "failed":
        return f"failed: {record.get('error', '')}"
    if "queuePosition" in record:
        return f"queued, position {record['queuePosition']}"
    return "running" if "started" in record else "waiting to start"


def _cancel(client: Client, jobid: str) -> None:
    try:
        client.cancel(jobid)
    except ApiError as error:  # it ended meanwhile (404 not running)
        print(f"dreamserve: {error}", file=sys.stderr)
    else:
        print(f"dreamserve: cancelled job {jobid}", file=sys.stderr)


def _reference_account(client: Client, model: str | None) -> str:
    """Where references go when no --account is given: the account the server would run the
    job on, as far as a client can tell. References bind a job to their account, so this is
    the account the job then runs on: one that serves the model (any, without --model), is not
    in error, of the highest priority among those with a free slot, at random among equals."""
    serving = [
        summary
        for summary in client.accounts().values()
        if "error" not in summary and (model is None or model in _models(summary))
    ]
    if not serving:
        raise ClientError(f"No account serves model {model}" if model else "No account to use")
    free = [s for s in serving if s.get("running", 0) < s.get("maxJobs", 1)] or serving
    top = max(s.get("priority", 0) for s in free)
    return random.choice([s["account"] for s in free if s.get("priority", 0) == top])


def _models(summary: AccountSummary) -> list[str]:
    return summary.get("models", {}).get("image", [])


def _jobs(client: Client, args: argparse.Namespace) -> int:
    def listing() -> list[JobRecord]:
        found = client.jobs(
            status=args.status,
            model=args.model,
            account=args.account,
            limit=max(1, min(args.limit, 100)),
        )
        return list(islice(found, args.limit))

    if not args.watch:
        _print_jobs(listing())
        return 0
    if not sys.stdout.isatty():
        return _log_jobs(listing, args.interval)
    from rich.live import Live

    with Live(_table(listing()), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(args.interval)
                live.update(_table(listing()), refresh=True)
        except KeyboardInterrupt:
            return 0  # the way to stop watching


def _log_jobs(listing: Callable[[], list[JobRecord]], interval: float) -> int:
    """`jobs --watch` into a pipe or a file: a redrawn table would be lost there, so each job's
    line (as `jobs` prints it) comes once, then again whenever it changes, oldest first within
    one look: a log to follow, until Ctrl-C."""
    shown: dict[str, list[str]] = {}
    try:
        while True:
            for record in reversed(listing()):
                row = _row(record)
                if shown.get(record["jobid"]) != row:
                    shown[record["jobid"]] = row
                    print("\t".join(row), flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _print_jobs(records: Sequence[JobRecord]) -> None:
    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(_table(records))
        return
    for record in records:
        print("\t".join(_row(record)))


_COLUMNS = ("jobid", "type", "model", "status", "created", "progress / error")


def _table(records: Iterable[JobRecord]) -> Table:
    from rich.table import Column, Table

    # A job id is never cut (`j1207…` cannot be given to `upscale`): folded onto more lines
    # where the terminal is narrow, as the other values are.
    columns = [Column(name, overflow="fold") for name in _COLUMNS]
    table = Table(*columns, title="jobs, newest first")
    for record in records:
        table.add_row(*_row(record))
    return table


def _row(record: JobRecord) -> list[str]:
    if record["status"] == "failed":
        note = record.get("error", "")
    elif record["status"] == "completed":
        count = len(record["response"].get("images", []))
        note = f"{count} image{'s' if count != 1 else ''}"
    else:
        note = _state(record) + (f" {record['progress']}%" if "progress" in record else "")
    return [
        record["jobid"],
        record["type"],
        record["model"],
        record["status"],
        record["created"],
        note,
    ]
