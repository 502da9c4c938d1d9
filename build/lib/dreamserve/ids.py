"""Identifiers of the contract: job ids, item ids, asset ids and refs, account ids, tokens.

Pure: formatting and parsing only, with the clock and the random source injected.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from itertools import count
from random import Random
from typing import Literal
from urllib.parse import unquote

JobType = Literal["image", "upscale"]
TYPE_LETTERS: dict[JobType, str] = {"image": "i", "upscale": "I"}

# ASCII: `\d` would match any Unicode digit, `\s` any Unicode space.
_JOBID = re.compile(r"j(\d{10})(\d{3})(\d{6})([iI])-u(\d{1,18})-(.+)-bot:dreamina", re.ASCII)
_ACCOUNT = re.compile(r"[A-Za-z0-9_]{1,32}:[^\s/?#%\\\x00-\x1f\x7f]{1,200}", re.ASCII)
_REGION = re.compile(r"[A-Za-z0-9_]{1,32}", re.ASCII)
# Sizes as images can have them: sides from 1 to 999999 pixels, at most 12 digits of bytes.
_ASSET_REF = re.compile(
    r"(.+)-image:w([1-9]\d{0,5}):h([1-9]\d{0,5}):s(\d{1,12})-uri:([A-Za-z0-9._/-]{1,512})", re.ASCII
)
_ASSET_ID = re.compile(r"(.+):(\d{19})", re.ASCII)
_TOKEN = re.compile(r"user:(\d{1,18})-([A-Za-z0-9_-]{20,200})", re.ASCII)


@dataclass(frozen=True)
class JobId:
    created: str  # MMDDhhmmss + milliseconds, as in the id
    serial: str
    type: JobType
    user_id: int
    account: str


@dataclass(frozen=True)
class AssetRef:
    account: str
    width: int
    height: int
    size: int
    uri: str

    def __str__(self) -> str:
        return f"{self.account}-image:w{self.width}:h{self.height}:s{self.size}-uri:{self.uri}"


class IdFactory:
    """Makes job ids and item ids. Each carries a 6-digit serial from a counter that starts at a
    random point, so two ids made in the same millisecond by one process never collide and two
    processes rarely do (the database's unique constraints catch the rest)."""

    def __init__(self, rng: Random | None = None) -> None:
        start = (rng or Random(secrets.randbits(64))).randrange(1_000_000)
        self._serials = count(start)

    def _serial(self) -> int:
        return next(self._serials) % 1_000_000

    def jobid(self, job_type: JobType, user_id: int, account: str, at: datetime) -> str:
        seconds, millis = divmod(epoch_millis(at), 1000)
        letter = TYPE_LETTERS[job_type]
        return (
            f"j{_jobid_second(seconds)}{millis:03d}{self._serial():06d}{letter}"
            f"-u{user_id}-{account}-bot:dreamina"
        )

    def item_id(self, at: datetime) -> str:
        """19 digits: milliseconds since the epoch (13) and the serial (6)."""
        millis = epoch_millis(at)
        return f"{millis:013d}{self._serial():06d}"


def parse_jobid(text: str) -> JobId | None:
    match = _JOBID.fullmatch(text)
    if match is None:
        return None
    stamp, millis, serial, letter, user, account = match.groups()
    job_type: JobType = "image" if letter == "i" else "upscale"
    return JobId(stamp + millis, serial, job_type, int(user), account)


def is_account_id(text: str) -> bool:
    """`REGION:name`: a region of letters, digits or `_`, then a name without spaces (of any
    script), control characters or `/`."""
    return _ACCOUNT.fullmatch(text) is not None and all(
        ch.isprintable() and not ch.isspace() for ch in text
    )


def is_region(text: str) -> bool:
    return _REGION.fullmatch(text) is not None


def parse_asset_ref(text: str) -> AssetRef | None:
    match = _ASSET_REF.fullmatch(text)
    if match is None or not is_account_id(match.group(1)):
        return None
    account, width, height, size, uri = match.groups()
    return AssetRef(account, int(width), int(height), int(size), uri)


def asset_id(account: str, item_id: str) -> str:
    return f"{account}:{item_id}"


def parse_asset_id(text: str) -> tuple[str, str] | None:
    """(account, itemId) of an assetId, or None when it is not one."""
    match = _ASSET_ID.fullmatch(text)
    if match is None or not is_account_id(match.group(1)):
        return None
    return match.group(1), match.group(2)


def new_token(user_id: int) -> str:
    return f"user:{user_id}-{secrets.token_urlsafe(32)}"


def parse_token(text: str) -> int | None:
    """The user id a well-formed token names, or None; says nothing about its validity."""
    match = _TOKEN.fullmatch(text)
    return int(match.group(1)) if match else None


def epoch_millis(at: datetime) -> int:
    """Whole milliseconds since the epoch, rounded down, exactly (a float timestamp loses
    microseconds far from 1970). A naive time is local time, as for `astimezone`."""
    return (at.astimezone(UTC) - _EPOCH) // _MILLISECOND


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def iso(at: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and `Z`, as every timestamp of the contract."""
    return iso_millis(epoch_millis(at))


def iso_millis(value: int) -> str:
    """`iso` of a time in milliseconds since the epoch."""
    seconds, millis = divmod(value, 1000)
    return f"{_utc_second(seconds)}.{millis:03d}Z"


# A second's text is remembered: formatting a date costs more than the rest of a job id or a
# record, and most of the times formatted at once fall in a few seconds.


@lru_cache(maxsize=64)
def _utc_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@lru_cache(maxsize=64)
def _jobid_second(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%m%d%H%M%S")


def unquoted(text: str) -> str:
    """A path segment percent-encoded twice on its way here, decoded once more (job and
    account ids never hold a `%`)."""
    return unquote(text) if "%" in text else text


def new_message_id() -> str:
    """A `webhook-id`: unique per delivery, the same on each of its tries."""
    return "msg_" + secrets.token_urlsafe(18)
