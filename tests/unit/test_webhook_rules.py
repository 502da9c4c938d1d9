"""The retry schedule, the address guard and the signatures of webhooks.py."""

from __future__ import annotations

from datetime import UTC, datetime
from random import Random

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from dreamserve.ids import new_message_id
from dreamserve.netguard import HostRefused, check_host, refusal
from dreamserve.storage.webhook_queries import receiver_host
from dreamserve.webhooks.rules import (
    HOST_COOLDOWN,
    HOST_COOLDOWN_MAX,
    HOST_FAILURES,
    JITTER,
    RETRY_DELAYS,
    TRIES,
    host_cooldown,
    new_secret,
    retry_delay,
    should_retry,
    signature,
)


def test_a_host_cools_down_after_failures_in_a_row_doubling_up_to_the_cap() -> None:
    assert [host_cooldown(n) for n in range(HOST_FAILURES)] == [None] * HOST_FAILURES
    cooldowns = [host_cooldown(HOST_FAILURES + n) for n in range(10)]
    assert cooldowns[:3] == [HOST_COOLDOWN, 2 * HOST_COOLDOWN, 4 * HOST_COOLDOWN]
    assert cooldowns == sorted(cooldowns)  # growing
    assert cooldowns[-1] == HOST_COOLDOWN_MAX == host_cooldown(10_000)  # and capped


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("https://Hooks.Example/x?y=1", "hooks.example:443"),
        ("http://hooks.example/x", "hooks.example:80"),
        ("http://hooks.example:8080/x", "hooks.example:8080"),
        ("https://user:pw@hooks.example:443/x", "hooks.example:443"),
        ("http://[2001:DB8::1]:9000/", "[2001:db8::1]:9000"),
        ("http://93.184.216.34/hook", "93.184.216.34:80"),
    ],
)
def test_a_receiver_is_its_host_and_port(url: str, host: str) -> None:
    assert receiver_host(url) == host


class Extreme(Random):
    """A random source that always draws its lowest (or highest) value."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def test_the_schedule_spans_more_than_a_day_even_with_every_delay_shrunk() -> None:
    shortest = sum(retry_delay(tries, Extreme(high=False)) or 0 for tries in range(1, TRIES))
    longest = sum(retry_delay(tries, Extreme(high=True)) or 0 for tries in range(1, TRIES))
    assert shortest >= 24 * 3600
    assert shortest == pytest.approx(sum(RETRY_DELAYS) * (1 - JITTER))
    assert longest == pytest.approx(sum(RETRY_DELAYS) * (1 + JITTER))


def test_delays_grow_and_end_after_the_last_try() -> None:
    rng = Random(7)
    delays = [retry_delay(tries, rng) for tries in range(1, TRIES)]
    assert all(delay is not None for delay in delays)
    assert tuple(sorted(RETRY_DELAYS)) == RETRY_DELAYS
    for delay, planned in zip(delays, RETRY_DELAYS, strict=True):
        assert planned * (1 - JITTER) <= (delay or 0) <= planned * (1 + JITTER)
    assert retry_delay(TRIES, rng) is None
    assert retry_delay(TRIES + 5, rng) is None


def test_jitter_spreads_receivers_coming_back() -> None:
    delays = {retry_delay(3, Random(seed)) for seed in range(20)}
    assert len(delays) == 20


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (200, False),
        (204, False),
        (299, False),
        (410, False),
        (301, True),
        (302, True),
        (400, True),
        (401, True),
        (404, True),
        (429, True),
        (500, True),
        (503, True),
    ],
)
def test_which_answers_are_retried(status: int, retry: bool) -> None:
    assert should_retry(status) is retry


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.8.9.10", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("fc00::1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("fe80::1", "a link-local address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("ff02::1", "a multicast address"),
        ("ff0e::1", "a multicast address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:10.0.0.1", "a private address"),
        ("64:ff9b::a00:1", "a private address"),
        ("2002:7f00:1::", "a loopback address"),
        ("0.0.0.0", "a private address"),
        ("100.64.0.1", "not a public address"),
        ("2001:db8::1", "a private address"),
        ("::7f00:1", "a loopback address"),
        ("::169.254.169.254", "a cloud metadata address"),
        ("::ffff:0:7f00:1", "a loopback address"),
        ("64:ff9b:1::a00:1", "not a public address"),
        ("fec0::1", "a private address"),
        ("8.8.8.8", None),
        ("93.184.216.34", None),
        ("2606:4700:4700::1111", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_refused_addresses(address: str, reason: str | None) -> None:
    assert refusal(address) == reason


def resolver_of(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("Name or service not known")
        return table[host]

    return resolve


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:8000/hook", "127.0.0.1 is a loopback address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://10.0.0.7/hook", "10.0.0.7 is a private address"),
        ("http://169.254.169.254/latest", "169.254.169.254 is a cloud metadata address"),
        (
            "https://intranet.example/x",
            "intranet.example resolves to 192.168.0.5, a private address",
        ),
        ("https://split.example/x", "split.example resolves to 10.9.9.9, a private address"),
        ("https://nowhere.example/x", "host nowhere.example does not resolve"),
        ("https://empty.example/x", "host empty.example does not resolve"),
        ("https://a..b/x", "host a..b does not resolve"),
        ("https://" + "x" * 64 + ".example/x", f"host {'x' * 64}.example does not resolve"),
    ],
)
async def test_reply_urls_refused_at_submit(url: str, message: str) -> None:
    resolve = resolver_of(
        {
            "127.0.0.1": ["127.0.0.1"],
            "::1": ["::1"],
            "10.0.0.7": ["10.0.0.7"],
            "169.254.169.254": ["169.254.169.254"],
            "intranet.example": ["192.168.0.5"],
            "split.example": ["93.184.216.34", "10.9.9.9"],  # one bad address is enough
            "empty.example": [],
        }
    )
    with pytest.raises(HostRefused) as refused:
        await check_host(url, resolve)
    assert str(refused.value) == message


@pytest.mark.anyio
async def test_public_reply_urls_pass() -> None:
    resolve = resolver_of({"hooks.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    await check_host("https://hooks.example/dreamina?x=1", resolve)


@pytest.mark.anyio
async def test_the_default_resolver_resolves_literal_addresses_without_dns() -> None:
    await check_host("http://93.184.216.34:8080/hook")
    with pytest.raises(HostRefused, match=r"^127\.0\.0\.1 is a loopback address$"):
        await check_host("http://127.0.0.1/hook")
    with pytest.raises(HostRefused, match=r"^localhost resolves to .*a loopback address$"):
        await check_host("http://localhost:9/hook")
    for bad in ("http://a..b/", "http://.example.com/", "http://" + "y" * 64 + ".com/"):
        with pytest.raises(HostRefused, match=r"does not resolve$"):  # the codec's error
            await check_host(bad)


def test_signatures_verify_with_standardwebhooks_by_either_key() -> None:
    old, new = new_secret(), new_secret()
    assert old.startswith("whsec_")
    assert old != new
    message_id = new_message_id()
    at = datetime.now(UTC)
    body = '{"jobid":"x","status":"completed"}'
    header = signature([new, old], message_id, at, body)
    assert len(header.split(" ")) == 2
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": header,
    }
    for key in (new, old):
        assert Webhook(key).verify(body, headers) == {"jobid": "x", "status": "completed"}
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace("completed", "failed"), headers)
