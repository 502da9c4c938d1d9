"""`Client`: the API from blocking code (scripts, notebooks, the CLI). `AsyncClient`
(`asynchronous.py`) has the same methods as coroutines."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import httpx

from dreamserve.client import calls
from dreamserve.client.calls import API_PREFIX, DEFAULT_TIMEOUT, Call, Retries, Upload
from dreamserve.client.errors import (
    ClientError,
    ConnectionFailed,
    JobFailed,
    WaitTimedOut,
    error_from,
)
from dreamserve.replies import (
    AccountDeleted,
    AccountSummary,
    AssetDeleted,
    AssetPage,
    AssetUploaded,
    ImageOut,
    JobPage,
    JobRecord,
    Scheduler,
    WebhookDeliveries,
    WebhookSecret,
)


class Client:
    """The API of one server (`base_url` is its root, e.g. `http://127.0.0.1:8000` or
    `https://api.useapi.net`; default `DREAMSERVE_URL`, else `http://127.0.0.1:8000`) as one
    user (`token`, default `DREAMSERVE_TOKEN`). Every method returns the reply as the server
    sends it (the TypedDicts of `dreamserve.replies`) or raises an `ApiError` carrying the
    server's status and message. `retries`: how many more times a call may be sent (an int, or
    a `Retries`); `transport`: an httpx transport (tests, proxies)."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int | Retries = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url, token = calls.settings(base_url, token)
        self.retries = retries if isinstance(retries, Retries) else Retries(attempts=retries)
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.base_url + API_PREFIX,
            headers=calls.headers(token),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # Jobs

    def models(self) -> list[dict[str, Any]]:
        """The model catalogue (`GET /models`, dreamserve only)."""
        return cast(list[dict[str, Any]], self._json(calls.models())["models"])

    def submit(
        self,
        prompt: str | None = None,
        *,
        model: str | None = None,
        ratio: str | None = None,
        resolution: str | None = None,
        refs: Sequence[str] = (),
        image_strength: float | None = None,
        account: str | None = None,
        count: int | None = None,
        seed: int | None = None,
        queue_seconds: int | None = None,
        reply_url: str | None = None,
        reply_ref: str | None = None,
        max_jobs: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> JobRecord:
        """Create an image job (`POST /images`); its record, status `created`. `refs` are
        assetRefs, sent as `imageRef_1`...; `extra` fields are sent as named. Retried with one
        Idempotency-Key (yours, or a new one): a retry never makes a second job."""
        call = calls.submit(
            prompt,
            model=model,
            ratio=ratio,
            resolution=resolution,
            refs=refs,
            image_strength=image_strength,
            account=account,
            count=count,
            seed=seed,
            queue_seconds=queue_seconds,
            reply_url=reply_url,
            reply_ref=reply_ref,
            max_jobs=max_jobs,
            idempotency_key=idempotency_key,
            extra=extra,
        )
        return cast(JobRecord, self._json(call))

    def upscale(
        self,
        jobid: str,
        index: int | None = None,
        *,
        resolution: str | None = None,
        original_strength: float | None = None,
        detail_strength: float | None = None,
        reply_url: str | None = None,
        reply_ref: str | None = None,
        max_jobs: int | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> JobRecord:
        """Upscale image `index` of a completed job (`POST /images/upscale`, `imageIndex`,
        `upscaleResolution`...); the new job's record. Retried as `submit` is."""
        call = calls.upscale(
            jobid,
            index=index,
            resolution=resolution,
            original_strength=original_strength,
            detail_strength=detail_strength,
            reply_url=reply_url,
            reply_ref=reply_ref,
            max_jobs=max_jobs,
            idempotency_key=idempotency_key,
            extra=extra,
        )
        return cast(JobRecord, self._json(call))

    def get(self, jobid: str) -> JobRecord:
        return cast(JobRecord, self._json(calls.get(jobid)))

    def wait(self, jobid: str, timeout: float | None = None) -> JobRecord:
        """The job's record once it is `completed`, asking with `?wait=` (one held request per
        minute at most; a server that does not hold it is polled every 2 s). Raises `JobFailed`
        (with the record) when it ends `failed`, cancelled included, and `WaitTimedOut` when
        `timeout` seconds pass first (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = calls.LONGEST_WAIT if deadline is None else deadline - time.monotonic()
            asked = max(1, min(calls.LONGEST_WAIT, math.ceil(left)))
            started = time.monotonic()
            record = cast(JobRecord, self._json(calls.get(jobid, wait=asked)))
            if record["status"] == "completed":
                return record
            if record["status"] == "failed":
                raise JobFailed(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimedOut(record, cast(float, timeout))
            if time.monotonic() - started < calls.POLL_SECONDS:
                time.sleep(calls.POLL_SECONDS)

    def events(self, jobid: str) -> Iterator[JobRecord]:
        """The job's record now and at each change (`GET /images/<jobid>/events`, dreamserve
        only), until its final record, which ends the iteration. A stream the server ends
        early (it is stopping) ends the iteration without a final record."""
        # Here, not at the top: the server's CLI imports the client's commands.
        from httpx_sse import EventSource, SSEError

        response = self._send(calls.events(jobid), stream=True)
        try:
            for event in EventSource(response).iter_sse():
                if event.event not in ("progress", "done"):
                    continue
                yield calls.event_record(event.data)
                if event.event == "done":
                    return
        except httpx.TransportError as error:
            raise ConnectionFailed(unreachable(self.base_url, error)) from error
        except SSEError as error:
            raise ClientError(f"Not an event stream: {error}") from error
        finally:
            response.close()

    def jobs(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        account: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
    ) -> Iterator[JobRecord]:
        """Your jobs, newest first, across every page (`GET /images`, dreamserve only);
        `limit` is the page size (1-100). Pages are fetched as the iteration reaches them."""
        cursor: str | None = None
        while True:
            page = self.jobs_page(
                status=status,
                model=model,
                account=account,
                since=since,
                limit=limit,
                cursor=cursor,
            )
            yield from page["jobs"]
            cursor = page["next"]
            if cursor is None:
                return

    def jobs_page(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        account: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of `GET /images`: `{"jobs": [...], "next": cursor | None}`."""
        call = calls.jobs(status, model, account, since, limit, cursor)
        return cast(JobPage, self._json(call))

    def cancel(self, jobid: str) -> JobRecord:
        """Cancel a running or waiting job (`DELETE /scheduler/<jobid>`); its record, `failed`
        with `Cancelled by user`."""
        return cast(JobRecord, self._json(calls.cancel(jobid)))

    def scheduler(self) -> Scheduler:
        return cast(Scheduler, self._json(calls.scheduler()))

    # Images

    def upload(self, account: str, file: Upload, content_type: str | None = None) -> AssetUploaded:
        """Upload a reference image to `account` (`POST /assets/<account>`): a path, bytes or
        a binary file; its Content-Type is `content_type`, else told by its first bytes (JPEG,
        PNG, WebP). Pass the reply's `assetRef` in `submit(refs=[...])`. Not retried."""
        return cast(AssetUploaded, self._json(calls.upload(account, file, content_type)))

    def assets(
        self, account: str, count: int | None = None, offset: int | None = None
    ) -> AssetPage:
        return cast(AssetPage, self._json(calls.assets(account, count, offset)))

    def delete_asset(self, asset_id: str) -> AssetDeleted:
        return cast(AssetDeleted, self._json(calls.delete_asset(asset_id)))

    def download(self, image: str | ImageOut, path: str | os.PathLike[str] = ".") -> Path:
        """Save an image (an image of a record, or its `imageUrl`, absolute or relative to the
        server) to `path`, or into it when it is a directory (`<itemId>.<ext>`); the file's
        path. The link is fetched without the token, as signed links are."""
        url = calls.download_url(self.base_url, image)
        target = calls.download_path(path, url, image)
        response = self._send(calls.download(url), stream=True)
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        except BaseException as error:  # a dropped connection, a full disk, Ctrl-C: no half file
            partial.unlink(missing_ok=True)
            if isinstance(error, httpx.TransportError):
                raise ConnectionFailed(unreachable(url, error)) from error
            raise
        finally:
            response.close()
        return partial.replace(target)

    # Accounts

    def accounts(self) -> dict[str, AccountSummary]:
        return cast(dict[str, AccountSummary], self._json(calls.accounts()))

    def account(self, account_id: str) -> AccountSummary:
        return cast(AccountSummary, self._json(calls.account(account_id)))

    def put_account(
        self,
        account: str | None = None,
        *,
        engine: str | None = None,
        email: str | None = None,
        region: str | None = None,
        max_jobs: int | None = None,
        priority: int | None = None,
        models: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> AccountSummary:
        """Create or replace one of your accounts (`POST /accounts`); its summary."""
        call = calls.put_account(
            account,
            engine=engine,
            email=email,
            region=region,
            max_jobs=max_jobs,
            priority=priority,
            models=models,
            settings=settings,
            extra=extra,
        )
        return cast(AccountSummary, self._json(call))

    def delete_account(self, account_id: str) -> AccountDeleted:
        return cast(AccountDeleted, self._json(calls.delete_account(account_id)))

    # Webhooks

    def webhook_secret(self) -> WebhookSecret:
        return cast(WebhookSecret, self._json(calls.webhook_secret()))

    def rotate_webhook_secret(self) -> WebhookSecret:
        return cast(WebhookSecret, self._json(calls.rotate_webhook_secret()))

    def deliveries(self, jobid: str) -> WebhookDeliveries:
        return cast(WebhookDeliveries, self._json(calls.deliveries(jobid)))

    def redeliver(self, jobid: str) -> WebhookDeliveries:
        return cast(WebhookDeliveries, self._json(calls.redeliver(jobid)))

    # Sending

    def _json(self, call: Call) -> Any:
        return calls.parsed(self._send(call))

    def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        """Send the call, again as `self.retries` allows; a successful reply, or raise."""
        attempt = 0
        while True:
            request = self._request(call)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                delay = self.retries.delay(call, attempt, error=error)
                if delay is None:
                    raise ConnectionFailed(unreachable(request.url, error)) from error
            else:
                if response.is_success:
                    return response
                try:
                    response.read()
                except httpx.TransportError as error:
                    raise ConnectionFailed(unreachable(request.url, error)) from error
                finally:
                    response.close()
                delay = self.retries.delay(call, attempt, response=response)
                if delay is None:
                    raise error_from(response)
            time.sleep(delay)
            attempt += 1

    def _request(self, call: Call) -> httpx.Request:
        timeout = httpx.Timeout(self._timeout)
        if call.read_timeout is not None:
            timeout = httpx.Timeout(self._timeout, read=max(self._timeout, call.read_timeout))
        request = self._http.build_request(
            call.method,
            call.path,
            params=call.params,
            json=call.json,
            content=call.content,
            headers=call.headers,
            timeout=timeout,
        )
        if call.anonymous:
            request.headers.pop("Authorization", None)
        return request


def unreachable(where: str | httpx.URL, error: httpx.TransportError) -> str:
    """What a ConnectionFailed says: the URL without its query (a signed link's signature)."""
    url = httpx.URL(where).copy_with(query=None)
    return f"Cannot reach {url}: {str(error) or type(error).__name__}"
