"""Identifier formats of the contract: jobid, itemId, assetId, assetRef, tokens, timestamps."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from random import Random

from hypothesis import given
from hypothesis import strategies as st

from dreamserve.ids import (
    AssetRef,
    IdFactory,
    asset_id,
    epoch_millis,
    is_account_id,
    iso,
    iso_millis,
    new_token,
    parse_asset_id,
    parse_asset_ref,
    parse_jobid,
    parse_token,
)

AT = datetime(2026, 3, 2, 14, 5, 30, 123456, tzinfo=UTC)
accounts = st.from_regex(r"[A-Z]{2,6}:[a-z0-9._@+-]{1,30}", fullmatch=True)


def test_jobid_has_the_contract_format() -> None:
    jobid = IdFactory(Random(1)).jobid("image", 12345, "US:user@example.com", AT)
    assert re.fullmatch(r"j0302140530123\d{6}i-u12345-US:user@example\.com-bot:dreamina", jobid)


def test_upscale_jobs_use_the_capital_letter() -> None:
    jobid = IdFactory(Random(1)).jobid("upscale", 7, "LOCAL:gpu0", AT)
    assert re.fullmatch(r"j0302140530123\d{6}I-u7-LOCAL:gpu0-bot:dreamina", jobid)


def test_jobids_made_in_the_same_millisecond_differ() -> None:
    factory = IdFactory(Random(2))
    made = {factory.jobid("image", 1, "LOCAL:procedural", AT) for _ in range(5000)}
    assert len(made) == 5000


def test_item_ids_are_19_digits_and_unique() -> None:
    factory = IdFactory(Random(3))
    made = [factory.item_id(AT) for _ in range(2000)]
    assert all(re.fullmatch(r"\d{19}", item) for item in made)
    assert len(set(made)) == 2000


@given(
    user=st.integers(min_value=1, max_value=10**12),
    account=accounts,
    kind=st.sampled_from(["image", "upscale"]),
    at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
)
def test_jobid_round_trips(user: int, account: str, kind: str, at: datetime) -> None:
    jobid = IdFactory().jobid(kind, user, account, at)  # type: ignore[arg-type]
    parsed = parse_jobid(jobid)
    assert parsed is not None
    assert (parsed.user_id, parsed.account, parsed.type) == (user, account, kind)
    assert parsed.created == at.strftime("%m%d%H%M%S") + f"{at.microsecond // 1000:03d}"


@given(
    account=accounts,
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    size=st.integers(0, 10**10),
    uri=st.from_regex(r"[a-z0-9_-]{1,10}(/[a-z0-9_-]{1,10}){0,3}\.(jpg|png|webp)", fullmatch=True),
)
def test_asset_ref_round_trips(account: str, width: int, height: int, size: int, uri: str) -> None:
    ref = AssetRef(account, width, height, size, uri)
    text = str(ref)
    assert text == f"{account}-image:w{width}:h{height}:s{size}-uri:{uri}"
    assert parse_asset_ref(text) == ref


@given(account=accounts, item=st.from_regex(r"[0-9]{19}", fullmatch=True))
def test_asset_id_round_trips(account: str, item: str) -> None:
    assert parse_asset_id(asset_id(account, item)) == (account, item)


def test_malformed_refs_are_refused() -> None:
    assert parse_asset_ref("nonsense") is None
    assert parse_asset_ref("US:a-image:w1:h2:s3-uri:") is None
    assert parse_asset_ref("noregion-image:w1:h2:s3-uri:a.jpg") is None
    assert parse_asset_ref("US:a-image:wX:h2:s3-uri:a.jpg") is None


def test_account_ids() -> None:
    assert is_account_id("US:studio@example.com")
    assert is_account_id("LOCAL:gpu0")
    assert not is_account_id("nocolon")
    assert not is_account_id("US:has space")
    assert not is_account_id("US:a/b")
    assert not is_account_id(":empty")


def test_tokens() -> None:
    token = new_token(42)
    assert re.fullmatch(r"user:42-[A-Za-z0-9_-]{20,}", token)
    assert parse_token(token) == 42
    assert parse_token("user:42-short") is None
    assert parse_token("user:x-" + "a" * 30) is None
    assert parse_token("Bearer " + token) is None


def test_timestamps_are_iso_utc_with_milliseconds_and_z() -> None:
    assert iso(AT) == "2026-03-02T14:05:30.123Z"
    assert iso_millis(1772460330123) == "2026-03-02T14:05:30.123Z"
    assert iso(datetime(2026, 3, 2, 23, 5, 30, 7000, tzinfo=timezone(timedelta(hours=9)))) == (
        "2026-03-02T14:05:30.007Z"
    )


@given(st.datetimes(min_value=datetime(1971, 1, 1), timezones=st.just(UTC)))
def test_timestamps_and_jobids_tell_the_same_time(at: datetime) -> None:
    expected = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
    assert iso(at) == expected
    assert iso_millis(epoch_millis(at)) == expected
    parsed = parse_jobid(IdFactory().jobid("image", 1, "US:a", at))
    assert parsed is not None
    assert parsed.created == at.strftime("%m%d%H%M%S") + expected[20:23]


def test_asset_ref_sizes_are_bounded() -> None:
    ref = "US:a-image:w{w}:h{h}:s{s}-uri:a.jpg"
    assert parse_asset_ref(ref.format(w=999999, h=1, s=10**12 - 1)) is not None
    arabic_three = "\u0663"
    bad = [(0, 5, 1), (5, 0, 1), (10**6, 5, 1), (5, 5, 10**12), (arabic_three, 5, 1), ("01", 5, 1)]
    for w, h, s in bad:
        assert parse_asset_ref(ref.format(w=w, h=h, s=s)) is None, (w, h, s)


def test_ids_take_ascii_digits_only() -> None:
    arabic = "".join(chr(0x0660 + n) for n in range(10))  # the Arabic-Indic digits 0 to 9
    assert parse_token(f"user:{arabic[1]}-" + "a" * 30) is None
    assert parse_asset_id("US:a:" + arabic[0] * 19) is None
    assert parse_jobid(f"j{(arabic * 2)[:19]}i-u1-US:a-bot:dreamina") is None
    assert parse_jobid("j" + "0" * 19 + "i-u1-US:a-bot:dreamina") is not None
