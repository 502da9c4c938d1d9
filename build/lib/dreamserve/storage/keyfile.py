"""The server's secret key: random bytes in a file of the data dir, made on first start (0600)."""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path


def load_or_create_key(path: Path) -> bytes:
    """The key stored at `path`, creating it (readable by the owner only) when missing.

    The file appears whole or not at all (written aside, then hard-linked into place), so two
    processes starting at once agree on one key.
    """
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32))
            os.link(temporary, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return bytes.fromhex(path.read_text().strip())
