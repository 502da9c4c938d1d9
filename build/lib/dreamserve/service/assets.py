"""Assets: uploaded reference images and the generated images of a user's jobs, listed a page
at a time and deleted with their files; and the files behind signed links."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import Connection

from dreamserve.assets import check_image
from dreamserve.encoding import EXTENSIONS
from dreamserve.errors import AssetNotFound, StorageUnavailable
from dreamserve.fields import integer
from dreamserve.ids import AssetRef, IdFactory, asset_id, iso_millis, parse_asset_id, unquoted
from dreamserve.jobs import millis
from dreamserve.replies import AssetDeleted, AssetListed, AssetPage, AssetUploaded, ImageFormat
from dreamserve.service.accounts import visible
from dreamserve.service.config import ServiceConfig
from dreamserve.storage import asset_queries
from dreamserve.storage.account_queries import Account
from dreamserve.storage.blobs import BlobStore
from dreamserve.storage.database import Database

log = logging.getLogger(__name__)


class Assets:
    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        ids: IdFactory,
        clock: Callable[[], datetime],
        config: ServiceConfig,
    ) -> None:
        self.db = db
        self.blobs = blobs
        self.ids = ids
        self.clock = clock
        self.config = config
        self._decoding = asyncio.Semaphore(config.upload_decodes)

    async def upload(
        self, user_id: int, account: Account, media: str, data: IO[bytes]
    ) -> AssetUploaded:
        """Store an uploaded image on an account the user may use (`usable_account`); its
        assetRef. The whole of `data` (a file: the API spools uploads) must be a complete
        image of `media` (BadRequest saying what is wrong otherwise)."""
        loop = asyncio.get_running_loop()
        async with self._decoding:  # a small file can decode to a large image: few at a time
            checked = await loop.run_in_executor(
                None, check_image, data, media, self.config.max_upload_pixels
            )
        size = data.seek(0, os.SEEK_END)
        data.seek(0)
        at = self.clock()
        item_id = self.ids.item_id(at)
        key = f"uploads/{at:%Y/%m/%d}/{item_id}.{EXTENSIONS[checked.format]}"
        await self.blobs.put_file(key, data)

        def insert(conn: Connection) -> None:
            asset_queries.insert_upload(
                conn,
                item_id=item_id,
                user_id=user_id,
                account_id=account.id,
                account=account.name,
                uri=key,
                width=checked.width,
                height=checked.height,
                image_format=checked.format,
                size=size,
                now=millis(at),
            )

        try:
            await self.db.write(insert)
        except BaseException:
            await self.blobs.delete(key)  # no file without its row
            raise
        ref = str(AssetRef(account.name, checked.width, checked.height, size, key))
        return {
            "assetRef": ref,
            "imageRef": ref,  # the hosted API's first name for it, which older clients read
            "account": account.name,
            "width": checked.width,
            "height": checked.height,
            "size": size,
        }

    async def page(self, user_id: int, account_name: str, fields: Mapping[str, Any]) -> AssetPage:
        """The user's generated images on an account, newest first, a page at a time."""
        account_name = unquoted(account_name)
        count = integer(fields, "count", 1, 100) or 20
        offset = integer(fields, "offset", 0, 2**31 - 1) or 0

        def page(conn: Connection) -> list[asset_queries.Asset]:
            visible(conn, user_id, account_name)
            return asset_queries.generated_page(conn, user_id, account_name, count + 1, offset)

        found = await self.db.read(page)
        more = len(found) > count
        return {
            "assets": [self._listed(asset) for asset in found[:count]],
            "hasMore": more,
            "nextOffset": offset + count if more else None,
            "account": account_name,
        }

    def _listed(self, asset: asset_queries.Asset) -> AssetListed:
        ref = AssetRef(asset.account, asset.width, asset.height, asset.size, asset.uri)
        return {
            "assetId": asset_id(asset.account, asset.item_id),
            "itemId": asset.item_id,
            "type": "image",
            "description": asset.description,
            "assetRef": str(ref),
            "imageUrl": self.blobs.link(asset.uri),
            "width": asset.width,
            "height": asset.height,
            "format": cast(ImageFormat, asset.format),  # as the upload check and encoder store
            "createdAt": iso_millis(asset.created_at),
        }

    async def delete(self, user_id: int, text: str) -> AssetDeleted:
        """Delete one of the user's assets and its file; AssetNotFound otherwise.

        The file goes first, then the row: when the blob store cannot remove the file
        (StorageUnavailable, 503) the asset is left whole, listed and usable, and the same
        request can be retried. A retry after a failure between the two finds the file gone
        (no error) and removes the row."""
        text = unquoted(text)
        parsed = parse_asset_id(text)
        if parsed is None:
            raise AssetNotFound(text)
        account, item_id = parsed

        def find(conn: Connection) -> asset_queries.Asset:
            asset = asset_queries.asset_by_item(conn, user_id, account, item_id)
            if asset is None:
                raise AssetNotFound(text)
            return asset

        asset = await self.db.read(find)
        try:
            await self.blobs.delete(asset.uri)
        except OSError as error:
            log.warning("asset %s kept: its file %s cannot be removed (%s)", text, asset.uri, error)
            raise StorageUnavailable from None

        # The job's record keeps listing the image (so that imageIndex keeps meaning the same
        # image): its link answers 404 and it is no reference or upscale source any more.
        def remove(conn: Connection) -> None:
            if not asset_queries.delete_asset(conn, asset.id):
                raise AssetNotFound(text)  # a delete at the same time went first

        await self.db.write(remove)
        return {"deleted": True, "assetId": text, "account": account}

    async def open_link(self, key: str, expires: str | None, signature: str | None) -> bytes | Path:
        """What a link of the blob store points at (a file to stream, or bytes); Forbidden when
        the link is tampered or expired, NotFound when the blob is gone (BlobStore.open_link)."""
        return await self.blobs.open_link(key, expires, signature)
