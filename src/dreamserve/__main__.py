"""The `dreamserve` command (`python -m dreamserve` too).

The client's commands (`generate`, `jobs`, `upscale`: dreamserve/client/cli.py) need only the
client's dependencies, which are all that `pip install dreamserve` installs; they are picked
before anything of the server is imported, so they start quickly wherever they run. Every other
command is the server's (dreamserve/cli.py, `pip install 'dreamserve[server]'`); where the server
is not installed, `dreamserve` offers the client's commands and says how to install the rest.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dreamserve.client import cli as client_cli

# The top-level packages of the server extra that dreamserve.cli imports when it loads.
SERVER_PACKAGES = frozenset(
    {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "pydantic_settings", "orjson"}
    | {"PIL", "numpy", "cryptography", "prometheus_client", "procrastinate", "psycopg", "mcp"}
    | {"fastapi_offline", "multipart", "python_multipart", "httpcore", "anyio"}
)
NO_SERVER = (
    "dreamserve: {command} is a server command, and the server is not installed here "
    "({module} is missing): pip install 'dreamserve[server]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in client_cli.COMMANDS:
        return client_cli.main(args)
    try:
        from dreamserve import cli
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in SERVER_PACKAGES:
            raise
        if not args or args[0].startswith("-"):  # --help, --version: the client's own
            return client_cli.main(args, server_missing=error.name)
        print(NO_SERVER.format(command=args[0], module=error.name), file=sys.stderr)
        return 1
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
