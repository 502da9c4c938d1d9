"""`AsyncClient`: the API from asyncio code, the same methods as `Client` (`sync.py`) as
coroutines (and async iterators for `events` and `jobs`)."""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
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
from dreamserve.client.sync import unreachable
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


class AsyncClient:
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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url, token = calls.settings(base_url, token)
        self.retries = retries if isinstance(retries, Retries) else Retries(attempts=retries)
        self._timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url + API_PREFIX,
            headers=calls.headers(token),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    # Jobs

    async def models(self) -> list[dict[str, Any]]:
        """The model catalogue (`GET /models`, dreamserve only)."""
        return cast(list[dict[str, Any]], (await self._json(calls.models()))["models"])

    async def submit(
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
        return cast(JobRecord, await self._json(call))

    async def upscale(
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
        return cast(JobRecord, await self._json(call))

    async def get(self, jobid: str) -> JobRecord:
        return cast(JobRecord, await self._json(calls.get(jobid)))

    # `timeout` as Client.wait has it: a bound on the whole wait that raises WaitTimedOut with
    # the last record seen, which asyncio.timeout would not give.
    async def wait(self, jobid: str, timeout: float | None = None) -> JobRecord:  # noqa: ASYNC109
        """The job's record once it is `completed`, asking with `?wait=` (one held request per
        minute at most; a server that does not hold it is polled every 2 s). Raises `JobFailed`
        (with the record) when it ends `failed`, cancelled included, and `WaitTimedOut` when
        `timeout` seconds pass first (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = calls.LONGEST_WAIT if deadline is None else deadline - time.monotonic()
            asked = max(1, min(calls.LONGEST_WAIT, math.ceil(left)))
            started = time.monotonic()
            record = cast(JobRecord, await self._json(calls.get(jobid, wait=asked)))
            if record["status"] == "completed":
                return record
            if record["status"] == "failed":
                raise JobFailed(record)
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimedOut(record, cast(float, timeout))
            if time.monotonic() - started < calls.POLL_SECONDS:
                await asyncio.sleep(calls.POLL_SECONDS)

    async def events(self, jobid: str) -> AsyncIterator[JobRecord]:
        """The job's record now and at each change (`GET /images/<jobid>/events`, dreamserve
        only), until its final record, which ends the iteration. A stream the server ends
        early (it is stopping) ends the iteration without a final record."""
        # Here, not at the top: the server's CLI imports the client's commands.
        from httpx_sse import EventSource, SSEError

        response = await self._send(calls.events(jobid), stream=True)
        try:
            async for event in EventSource(response).aiter_sse():
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
            await response.aclose()

    async def jobs(
        self,
        *,
        status: str | None = None,
        model: str | None = None,
        account: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[JobRecord]:
        """Your jobs, newest first, across every page (`GET /images`, dreamserve only);
        `limit` is the page size (1-100). Pages are fetched as the iteration reaches them."""
        cursor: str | None = None
        while True:
            page = await self.jobs_page(
                status=status,
                model=model,
                account=account,
                since=since,
                limit=limit,
                cursor=cursor,
            )
            for record in page["jobs"]:
                yield record
            cursor = page["next"]
            if cursor is None:
                return

    async def jobs_page(
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
        return cast(JobPage, await self._json(call))

    async def cancel(self, jobid: str) -> JobRecord:
        """Cancel a running or waiting job (`DELETE /scheduler/<jobid>`); its record, `failed`
        with `Cancelled by user`."""
        return cast(JobRecord, await self._json(calls.cancel(jobid)))

    async def scheduler(self) -> Scheduler:
        return cast(Scheduler, await self._json(calls.scheduler()))

    # Images

    async def upload(
        self, account: str, file: Upload, content_type: str | None = None
    ) -> AssetUploaded:
        """Upload a reference image to `account` (`POST /assets/<account>`): a path, bytes or
        a binary file; its Content-Type is `content_type`, else told by its first bytes (JPEG,
        PNG, WebP). Pass the reply's `assetRef` in `submit(refs=[...])`. Not retried."""
        return cast(AssetUploaded, await self._json(calls.upload(account, file, content_type)))

    async def assets(
        self, account: str, count: int | None = None, offset: int | None = None
    ) -> AssetPage:
        return cast(AssetPage, await self._json(calls.assets(account, count, offset)))

    async def delete_asset(self, asset_id: str) -> AssetDeleted:
        return cast(AssetDeleted, await self._json(calls.delete_asset(asset_id)))

    async def download(self, image: str | ImageOut, path: str | os.PathLike[str] = ".") -> Path:
        """Save an image (an image of a record, or its `imageUrl`, absolute or relative to the
        server) to `path`, or into it when it is a directory (`<itemId>.<ext>`); the file's
        path. The link is fetched without the token, as signed links are."""
        url = calls.download_url(self.base_url, image)
        target = calls.download_path(path, url, image)
        response = await self._send(calls.download(url), stream=True)
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as file:
                async for chunk in response.aiter_bytes():
                    file.write(chunk)
        except BaseException as error:  # a dropped connection, a full disk, Ctrl-C: no half file
            partial.unlink(missing_ok=True)
            if isinstance(error, httpx.TransportError):
                raise ConnectionFailed(unreachable(url, error)) from error
            raise
        finally:
            await response.aclose()
        return partial.replace(target)

    # Accounts

    async def accounts(self) -> dict[str, AccountSummary]:
        return cast(dict[str, AccountSummary], await self._json(calls.accounts()))

    async def account(self, account_id: str) -> AccountSummary:
        return cast(AccountSummary, await self._json(calls.account(account_id)))

    async def put_account(
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
        return cast(AccountSummary, await self._json(call))

    async def delete_account(self, account_id: str) -> AccountDeleted:
        return cast(AccountDeleted, await self._json(calls.delete_account(account_id)))

    # Webhooks

    async def webhook_secret(self) -> WebhookSecret:
        return cast(WebhookSecret, await self._json(calls.webhook_secret()))

    async def rotate_webhook_secret(self) -> WebhookSecret:
        return cast(WebhookSecret, await self._json(calls.rotate_webhook_secret()))

    async def deliveries(self, jobid: str) -> WebhookDeliveries:
        return cast(WebhookDeliveries, await self._json(calls.deliveries(jobid)))

    async def redeliver(self, jobid: str) -> WebhookDeliveries:
        return cast(WebhookDeliveries, await self._json(calls.redeliver(jobid)))

    # Sending

    async def _json(self, call: Call) -> Any:
        return calls.parsed(await self._send(call))

    async def _send(self, call: Call, stream: bool = False) -> httpx.Response:
        """Send the call, again as `self.retries` allows; a successful reply, or raise."""
        attempt = 0
        while True:
            request = self._request(call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as error:
                delay = self.retries.delay(call, attempt, error=error)
                if delay is None:
                    raise ConnectionFailed(unreachable(request.url, error)) from error
            else:
                if response.is_success:
                    return response
                try:
                    await response.aread()
                except httpx.TransportError as error:
                    raise ConnectionFailed(unreachable(request.url, error)) from error
                finally:
                    await response.aclose()
                delay = self.retries.delay(call, attempt, response=response)
                if delay is None:
                    raise error_from(response)
            await asyncio.sleep(delay)
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
