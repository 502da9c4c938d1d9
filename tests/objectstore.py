"""An S3-compatible store for the tests: moto's server on 127.0.0.1, in a thread of the test
process, and the standard `AWS_*` variables that point obstore at it (as an operator's would point
at their store). Buckets are made with a plain PUT, as moto takes unsigned requests."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from moto.server import ThreadedMotoServer


@contextmanager
def moto_store() -> Iterator[str]:
    """moto's server on a free port of 127.0.0.1, for as long as the block runs: its URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def store_environment(endpoint: str) -> dict[str, str]:
    """The variables of an operator whose store is at `endpoint` (test credentials)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ALLOW_HTTP": "true",
    }


def new_bucket(endpoint: str) -> str:
    """A new, empty bucket: its name."""
    name = f"dreamserve-{uuid.uuid4().hex[:16]}"
    httpx.put(f"{endpoint}/{name}").raise_for_status()
    return name


def _client(endpoint: str, bucket: str) -> Any:
    """The bucket as any client of the store reads it, with the test credentials."""
    from obstore.store import S3Store

    variables = store_environment(endpoint)
    return S3Store(
        bucket,
        endpoint=endpoint,
        region=variables["AWS_REGION"],
        access_key_id=variables["AWS_ACCESS_KEY_ID"],
        secret_access_key=variables["AWS_SECRET_ACCESS_KEY"],
        client_options={"allow_http": True},
    )


def object_keys(endpoint: str, bucket: str) -> set[str]:
    """The keys of the bucket's objects."""
    import obstore

    return {meta["path"] for meta in obstore.list(_client(endpoint, bucket)).collect()}


def objects(endpoint: str, bucket: str) -> dict[str, bytes]:
    """Every object of the bucket, its bytes by key."""
    import obstore

    store = _client(endpoint, bucket)
    keys = [meta["path"] for meta in obstore.list(store).collect()]
    return {key: bytes(obstore.get(store, key).bytes()) for key in keys}
