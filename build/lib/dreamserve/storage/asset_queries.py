"""The SQL of assets: uploads, the generated images a user lists and deletes, reference checks.

Generated images are inserted with their job (job_queries.finish_job). Every query here is scoped
to one user: another user's asset does not exist for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from dreamserve.ids import AssetRef
from dreamserve.storage.tables import assets

GENERATED = "generated"
UPLOAD = "upload"


@dataclass(frozen=True)
class Asset:
    id: int
    item_id: str
    account: str
    kind: str
    uri: str
    width: int
    height: int
    format: str
    size: int
    description: str | None
    created_at: int


def existing_assets(conn: Connection, user_id: int, refs: Iterable[AssetRef]) -> set[AssetRef]:
    """Those of `refs` that name an image of this user, with exactly those properties."""
    wanted = set(refs)
    if not wanted:
        return set()
    query = select(
        assets.c.account, assets.c.width, assets.c.height, assets.c.size, assets.c.uri
    ).where(assets.c.user_id == user_id, assets.c.uri.in_({ref.uri for ref in wanted}))
    found = {AssetRef(*row) for row in conn.execute(query)}
    return wanted & found


def insert_upload(
    conn: Connection,
    *,
    item_id: str,
    user_id: int,
    account_id: int,
    account: str,
    uri: str,
    width: int,
    height: int,
    image_format: str,
    size: int,
    now: int,
) -> None:
    conn.execute(
        insert(assets).values(
            item_id=item_id,
            user_id=user_id,
            account_id=account_id,
            account=account,
            kind=UPLOAD,
            uri=uri,
            width=width,
            height=height,
            format=image_format,
            size=size,
            created_at=now,
        )
    )


def generated_page(
    conn: Connection, user_id: int, account: str, limit: int, offset: int
) -> list[Asset]:
    """The user's generated images on an account, newest first."""
    query = (
        select(assets)
        .where(assets.c.user_id == user_id, assets.c.account == account)
        .where(assets.c.kind == GENERATED)
        .order_by(assets.c.created_at.desc(), assets.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return [_asset(row) for row in conn.execute(query).mappings()]


def asset_by_item(conn: Connection, user_id: int, account: str, item_id: str) -> Asset | None:
    query = select(assets).where(
        assets.c.user_id == user_id, assets.c.account == account, assets.c.item_id == item_id
    )
    row = conn.execute(query).mappings().first()
    return None if row is None else _asset(row)


def description_of(conn: Connection, user_id: int, uri: str) -> str | None:
    query = select(assets.c.description).where(assets.c.user_id == user_id, assets.c.uri == uri)
    description: str | None = conn.execute(query).scalar_one_or_none()
    return description


def delete_asset(conn: Connection, asset_id: int) -> bool:
    """Whether the asset was there to delete."""
    return conn.execute(delete(assets).where(assets.c.id == asset_id)).rowcount > 0


def _asset(mapping: Mapping[Any, Any]) -> Asset:
    return Asset(**{each.name: mapping[each.name] for each in fields(Asset)})
