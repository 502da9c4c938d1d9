"""The blob store contract, run against every implementation, and the URLs that pick one.

Each store is opened from its URL by `open_blob_store`, as the server opens it; a new store is
one more entry in STORES.
"""

from __future__ import annotations

import asyncio
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from objectstore import moto_store, new_bucket, store_environment
from support import FakeClock

from dreamserve.config import ConfigError
from dreamserve.errors import Forbidden, NotFound
from dreamserve.links import FILES_PATH, LinkSigner
from dreamserve.settings import Settings
from dreamserve.storage.blobs import BlobStore, open_blob_store
from dreamserve.storage.local_blobs import LocalBlobStore
from dreamserve.storage.memory_blobs import MemoryBlobStore
from dreamserve.storage.s3_blobs import S3BlobStore

pytestmark = pytest.mark.anyio

TTL = 3600
BASE_URL = "http://testserver"
KEY = "images/2025/01/02/1234567890123456789.jpg"
OTHER = "uploads/2025/01/02/9876543210987654321.png"
# "{tmp}": the test's temporary directory, so that a store that wrongly takes an absolute key
# writes there, where the test looks, and nowhere else.
BAD_KEYS = ["../x.jpg", "../x", "a b.jpg", "", "{tmp}/x.jpg", "images/../x.jpg", "x"]
FORMS = "file:///<absolute dir>, file:<relative dir>, memory:// or s3://<bucket>[/<prefix>]"

# The URL of each implementation, given a fresh temporary directory and the S3 endpoint.
STORES: dict[str, Callable[[Path, str], str]] = {
    "file": lambda tmp, s3: (tmp / "blobs").as_uri(),
    "memory": lambda tmp, s3: "memory://",
    "s3": lambda tmp, s3: f"s3://{new_bucket(s3)}/dream/blobs",
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signer(clock: FakeClock) -> LinkSigner:
    return LinkSigner(b"k" * 32, BASE_URL, TTL, clock)


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path, signer: LinkSigner) -> BlobStore:
    endpoint = request.getfixturevalue("s3") if request.param == "s3" else ""
    return open_blob_store(STORES[request.param](tmp_path, endpoint), signer)


async def follow(store: BlobStore, url: str) -> bytes:
    """What a client gets from a link: the API's files route hands its key and query to the
    store's `open_link`, and serves the file or the bytes it returns."""
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == BASE_URL
    assert parts.path.startswith(FILES_PATH)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    key = unquote(parts.path.removeprefix(FILES_PATH))
    opened = await store.open_link(key, query.get("expires"), query.get("signature"))
    return opened.read_bytes() if isinstance(opened, Path) else opened


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()} | changes
    return parts._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()


# put / get / delete


async def test_get_returns_what_put_stored(store: BlobStore) -> None:
    await store.put(KEY, b"first image")
    await store.put(OTHER, b"second image")
    assert await store.get(KEY) == b"first image"
    assert await store.get(OTHER) == b"second image"


async def test_put_replaces_the_blob(store: BlobStore) -> None:
    await store.put(KEY, b"a longer first version")
    await store.put(KEY, b"short")
    assert await store.get(KEY) == b"short"


async def test_a_stored_blob_does_not_change_with_the_buffer_it_came_from(
    store: BlobStore,
) -> None:
    data = bytearray(b"pixels")
    await store.put(KEY, data)  # type: ignore[arg-type]  # a caller's buffer, not bytes
    data[:] = b"XXXXXX"
    assert await store.get(KEY) == b"pixels"


async def test_put_file_stores_the_file_from_its_position_and_replaces_the_blob(
    store: BlobStore,
) -> None:
    await store.put(KEY, b"an earlier version")
    data = b"header" + bytes(range(256)) * 2000  # past shutil's copy buffer
    with tempfile.TemporaryFile() as file:
        file.write(data)
        file.seek(6)
        await store.put_file(KEY, file)
    assert await store.get(KEY) == data[6:]


async def test_get_of_a_missing_key_raises_file_not_found(store: BlobStore) -> None:
    with pytest.raises(FileNotFoundError):
        await store.get(KEY)


async def test_delete_removes_the_blob_and_is_idempotent(store: BlobStore) -> None:
    await store.put(KEY, b"image")
    await store.put(OTHER, b"kept")
    await store.delete(KEY)
    with pytest.raises(FileNotFoundError):
        await store.get(KEY)
    await store.delete(KEY)  # already gone: no error
    await store.delete("images/never/stored.jpg")
    assert await store.get(OTHER) == b"kept"


@pytest.mark.parametrize("key", BAD_KEYS)
async def test_keys_that_are_not_blob_keys_are_refused(
    store: BlobStore, tmp_path: Path, key: str
) -> None:
    key = key.format(tmp=tmp_path)
    with pytest.raises(ValueError, match="not a blob key"):
        await store.put(key, b"image")
    with pytest.raises(ValueError, match="not a blob key"):
        await store.put_file(key, io.BytesIO(b"image"))
    with pytest.raises(ValueError, match="not a blob key"):
        await store.get(key)
    with pytest.raises(ValueError, match="not a blob key"):
        await store.delete(key)
    assert not (tmp_path / "x.jpg").exists()  # nothing written beside the store


async def test_readers_never_see_a_partial_blob(store: BlobStore) -> None:
    """Large blobs replaced while they are read: every read is one whole version."""
    versions = [bytes([byte]) * (4 << 20) for byte in b"ab"]
    await store.put(KEY, versions[0])
    writing = True
    seen: list[bytes] = []

    async def read() -> None:
        while writing:
            seen.append(await store.get(KEY))
            await asyncio.sleep(0)

    reader = asyncio.create_task(read())
    for turn in range(1, 17):
        await store.put(KEY, versions[turn % 2])
        await asyncio.sleep(0)  # the reader's turn, even when a put never waits
    writing = False
    await reader
    assert seen
    assert all(blob in versions for blob in seen)


# Links


async def test_a_link_fetches_the_blob(store: BlobStore) -> None:
    await store.put(KEY, b"image bytes")
    assert await follow(store, store.link(KEY)) == b"image bytes"


async def test_a_tampered_link_is_forbidden(store: BlobStore) -> None:
    await store.put(KEY, b"image")
    await store.put(OTHER, b"another image")
    url = store.link(KEY)
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    for bad in (
        with_query(url, signature="A" * 43),
        with_query(url, expires=str(expires + 3600)),
        with_query(url, expires="soon"),
        url.replace(KEY, OTHER),  # another blob, the same query
        url.split("?")[0],
    ):
        with pytest.raises(Forbidden, match=r"^Invalid link signature$"):
            await follow(store, bad)


async def test_a_link_works_until_its_expiry_and_is_forbidden_after(
    store: BlobStore, clock: FakeClock
) -> None:
    await store.put(KEY, b"image")
    url = store.link(KEY)
    expiry = store.link_expiry()
    clock.advance(expiry - clock.now.timestamp() - 1)
    assert await follow(store, url) == b"image"
    clock.advance(2)
    with pytest.raises(Forbidden, match=r"^Link expired$"):
        await follow(store, url)


async def test_links_stay_the_same_until_the_link_expiry_changes(
    store: BlobStore, clock: FakeClock
) -> None:
    start = clock.now.timestamp()
    expiry = store.link_expiry()
    url = store.link(KEY)
    assert start + TTL <= expiry <= start + TTL * 9 / 8
    while store.link_expiry() == expiry:
        assert store.link(KEY) == url
        clock.advance(TTL / 64)
    assert store.link_expiry() > expiry
    assert store.link(KEY) != url


async def test_a_valid_link_to_a_missing_blob_is_not_found(store: BlobStore) -> None:
    await store.put(KEY, b"image")
    url = store.link(KEY)
    await store.delete(KEY)
    with pytest.raises(NotFound, match=r"^File not found$"):
        await follow(store, url)
    with pytest.raises(NotFound, match=r"^File not found$"):
        await follow(store, store.link(OTHER))  # never stored


async def test_a_signed_key_that_leaves_the_store_is_not_found(
    store: BlobStore, signer: LinkSigner, tmp_path: Path
) -> None:
    """Even a correctly signed link reaches only the store's own blobs."""
    (tmp_path / "secret.key").write_bytes(b"secret")
    for key in ("../secret.key", f"{tmp_path}/secret.key", "a b.jpg"):
        expires = int(signer.expiry())
        query = f"?expires={expires}&signature={signer.sign(key, expires)}"
        with pytest.raises(NotFound, match=r"^File not found$"):
            await follow(store, f"{BASE_URL}{FILES_PATH}{key}{query}")


# An S3 store: presigned links, an unavailable store


async def test_presigned_links_fetch_the_object_from_the_store(
    s3: str, signer: LinkSigner, clock: FakeClock
) -> None:
    store = open_blob_store(f"s3://{new_bucket(s3)}/p", signer, presigned=True)
    await store.put(KEY, b"image bytes")
    url = store.link(KEY)
    assert url.startswith(f"{s3}/")
    assert "X-Amz-Signature=" in url
    async with httpx.AsyncClient() as client:  # a client's plain GET, to the store
        assert (await client.get(url)).content == b"image bytes"
    expiry = store.link_expiry()
    while store.link_expiry() == expiry:  # the same link within the window, like the API's own
        assert store.link(KEY) == url
        # Not TTL / 64: eight such steps cross a window (TTL / 8) with the time left to its
        # end unchanged, and a link signed within the same real second would be the same.
        clock.advance(TTL / 64 + 1)
    assert store.link(KEY) != url  # the next window's link, valid that much longer
    with pytest.raises(NotFound, match=r"^Not Found$"):  # the API's files route serves none
        await store.open_link(KEY, "1", "x")


def test_presigned_links_need_an_s3_store(signer: LinkSigner, tmp_path: Path) -> None:
    url = tmp_path.as_uri()
    with pytest.raises(ConfigError) as error:
        open_blob_store(url, signer, presigned=True)
    assert str(error.value) == f"Presigned links need an s3:// blob store, not {url}"


async def test_an_unavailable_store_is_an_os_error_naming_the_object(
    signer: LinkSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    with moto_store() as endpoint:
        pass  # a port that nothing listens on any more
    for name, value in store_environment(endpoint).items():
        monkeypatch.setenv(name, value)
    store = open_blob_store("s3://gone/p", signer)
    for call, action in ((store.put(KEY, b"x"), "store"), (store.get(KEY), "read")):
        with pytest.raises(OSError, match=rf"^object store: cannot {action} {KEY}: "):
            await call
    with pytest.raises(OSError, match=rf"^object store: cannot delete {KEY}: "):
        await store.delete(KEY)


# Choosing a store by URL


@pytest.mark.parametrize(
    ("url", "root"),
    [
        ("file:///srv/dream/blobs", Path("/srv/dream/blobs")),
        ("FILE:///srv/dream/blobs", Path("/srv/dream/blobs")),
        ("file://localhost/srv/dream/blobs", Path("/srv/dream/blobs")),
        ("file:///srv/my%20blobs/%C3%A9t%C3%A9", Path("/srv/my blobs/été")),
        ("file:data/blobs", Path("data/blobs")),
        ("file:./blobs", Path("blobs")),
    ],
)
def test_file_urls_open_a_local_store_on_their_directory(
    url: str, root: Path, signer: LinkSigner
) -> None:
    store = open_blob_store(url, signer)
    assert type(store) is LocalBlobStore
    assert store.root == root


def test_s3_urls_open_an_s3_store_on_their_bucket_and_prefix(signer: LinkSigner) -> None:
    store = open_blob_store("s3://dream-images/prod/blobs/", signer)
    assert type(store) is S3BlobStore
    assert (store.bucket, store.prefix, store.presigned) == ("dream-images", "prod/blobs", False)
    assert open_blob_store("s3://dream-images", signer).prefix == ""


@pytest.mark.parametrize("url", ["memory://", "memory:"])
def test_memory_urls_open_a_memory_store(url: str, signer: LinkSigner) -> None:
    assert type(open_blob_store(url, signer)) is MemoryBlobStore


async def test_each_memory_store_is_its_own(signer: LinkSigner) -> None:
    first = open_blob_store("memory://", signer)
    await first.put(KEY, b"image")
    with pytest.raises(FileNotFoundError):
        await open_blob_store("memory://", signer).get(KEY)


@pytest.mark.parametrize("url", ["gs://bucket", "https://cdn.example.com", "/srv/b"])
def test_other_schemes_are_refused_saying_what_is_accepted(url: str, signer: LinkSigner) -> None:
    with pytest.raises(ConfigError) as error:
        open_blob_store(url, signer)
    assert str(error.value) == f"Blob store URL {url} is not supported: use {FORMS}"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://data/blobs", f"Blob store URL file://data/blobs names the host data: use {FORMS}"),
        ("file://", f"Blob store URL file:// does not name a directory: use {FORMS}"),
        ("file:///b?x=1", f"Blob store URL file:///b?x=1 does not name a directory: use {FORMS}"),
        ("memory://cache", "Blob store URL memory://cache takes nothing after memory://"),
        ("s3://", f"Blob store URL s3:// does not name a bucket: use {FORMS}"),
        ("S3:/x", f"Blob store URL S3:/x does not name a bucket: use {FORMS}"),
        ("s3://b?r=x", f"Blob store URL s3://b?r=x does not name a bucket: use {FORMS}"),
    ],
)
def test_malformed_store_urls_are_refused(url: str, message: str, signer: LinkSigner) -> None:
    with pytest.raises(ConfigError) as error:
        open_blob_store(url, signer)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "data_dir", [Path("data"), Path("/srv/dream"), Path("/tmp/a b/100%/été"), Path("d?#x")]
)
def test_the_default_store_is_the_blobs_directory_of_the_data_dir(
    data_dir: Path, signer: LinkSigner
) -> None:
    store = open_blob_store(Settings(data_dir=data_dir).blob_store, signer)
    assert type(store) is LocalBlobStore
    assert store.root == data_dir / "blobs"


def test_the_blob_url_setting_replaces_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(data_dir=Path("data")).blob_store == "file:data/blobs"
    assert Settings(data_dir=Path("/srv/dream")).blob_store == "file:///srv/dream/blobs"
    monkeypatch.setenv("DREAMSERVE_BLOB_URL", "memory://")
    assert Settings().blob_store == "memory://"
