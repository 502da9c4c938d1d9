"""Blob keys: relative, slash-separated paths the server makes (never a client), which every
store accepts and nothing else."""

from __future__ import annotations

import re

_KEY = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*\.[A-Za-z0-9]+")


def check_key(key: str) -> str:
    """`key` itself; ValueError when it is not a blob key."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def is_blob_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None
