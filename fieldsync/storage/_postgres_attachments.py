"""The PostgreSQL backend's `AttachmentStore` (schema: migration 4). Each write is one
transaction of its own (it draws no change sequence number, so it never waits on the
documents' writers); the conditional UPDATEs on `received` make two nodes serving one upload
lose cleanly rather than interleave. Reads run in one snapshot."""

from __future__ import annotations

from collections.abc import Collection

from psycopg import AsyncConnection

from fieldsync.records import DocIndex
from fieldsync.storage._attachments import Attachment, Upload
from fieldsync.storage._postgres import PostgresStore

__all__ = ["PostgresAttachments"]

_UPLOAD_COLUMNS = "id, owner, wo, sha256, length, received, metadata, created_at, completed_at"
_ATTACHMENT_COLUMNS = "sha256, size, mime, width, height, created_at, by"


class PostgresAttachments:
    """`AttachmentStore` on the tables of a `PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def create_upload(self, upload: Upload) -> None:
        async def create(conn: AsyncConnection) -> None:
            await conn.execute(
                f"INSERT INTO uploads ({_UPLOAD_COLUMNS}, updated_at)"
                f" VALUES ({', '.join(['%s'] * 10)})",
                (
                    upload.id,
                    upload.owner,
                    upload.wo,
                    upload.sha256,
                    upload.length,
                    upload.received,
                    upload.metadata,
                    upload.created_at,
                    upload.completed_at,
                    upload.created_at,
                ),
            )
            if upload.completed_at is not None:
                await _add_reference(
                    conn, upload.sha256, upload.wo, upload.owner, upload.created_at
                )

        await self._store.run(create)

    async def upload(self, upload_id: str) -> Upload | None:
        async def read(conn: AsyncConnection) -> Upload | None:
            cursor = await conn.execute(
                f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = %s", (upload_id,)
            )
            row = await cursor.fetchone()
            return Upload(*row) if row else None

        return await self._store.query(read)

    async def record_received(self, upload_id: str, before: int, after: int, at: float) -> bool:
        return await self._store.run(
            lambda conn: _record_received(conn, upload_id, before, after, at)
        )

    async def complete_upload(
        self, upload: Upload, before: int, content: Attachment, at: float
    ) -> bool:
        async def complete(conn: AsyncConnection) -> bool:
            if not await _record_received(conn, upload.id, before, upload.length, at):
                return False
            await conn.execute(
                "UPDATE uploads SET completed_at = %s WHERE id = %s", (at, upload.id)
            )
            await conn.execute(
                f"INSERT INTO attachments ({_ATTACHMENT_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (sha256) DO NOTHING",
                (
                    content.sha256,
                    content.size,
                    content.mime,
                    content.width,
                    content.height,
                    content.created_at,
                    content.by,
                ),
            )
            await _add_reference(conn, content.sha256, upload.wo, upload.owner, at)
            return True

        return await self._store.run(complete)

    async def delete_upload(self, upload_id: str) -> bool:
        async def delete(conn: AsyncConnection) -> bool:
            cursor = await conn.execute("DELETE FROM uploads WHERE id = %s", (upload_id,))
            return cursor.rowcount == 1

        return await self._store.run(delete)

    async def stale_uploads(self, idle_since: float, limit: int = 1000) -> list[str]:
        async def read(conn: AsyncConnection) -> list[str]:
            cursor = await conn.execute(
                "SELECT id FROM uploads WHERE completed_at IS NULL AND updated_at < %s"
                " ORDER BY updated_at LIMIT %s",
                (idle_since, limit),
            )
            return [upload_id for (upload_id,) in await cursor.fetchall()]

        return await self._store.query(read)

    async def expire_upload(self, upload_id: str, idle_since: float) -> bool:
        async def expire(conn: AsyncConnection) -> bool:
            cursor = await conn.execute(
                "DELETE FROM uploads WHERE id = %s AND completed_at IS NULL AND updated_at < %s",
                (upload_id, idle_since),
            )
            return cursor.rowcount == 1

        return await self._store.run(expire)

    async def attachment(self, sha256: str) -> Attachment | None:
        async def read(conn: AsyncConnection) -> Attachment | None:
            cursor = await conn.execute(
                f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE sha256 = %s", (sha256,)
            )
            row = await cursor.fetchone()
            return Attachment(*row) if row else None

        return await self._store.query(read)

    async def readers(self, hashes: Collection[str]) -> dict[str, list[DocIndex]]:
        async def read(conn: AsyncConnection) -> dict[str, list[DocIndex]]:
            cursor = await conn.execute(
                """SELECT r.sha256, d.doc, d.type, d.wo, d.assignee, d.team, d.region
                FROM attachment_refs r JOIN doc_index d ON d.doc = r.wo
                WHERE r.sha256 = ANY(%s) ORDER BY r.sha256, d.doc""",
                (sorted(set(hashes)),),
            )
            found: dict[str, list[DocIndex]] = {}
            for sha256, *index in await cursor.fetchall():
                found.setdefault(sha256, []).append(DocIndex(*index))
            return found

        return await self._store.query(read)


async def _record_received(
    conn: AsyncConnection, upload_id: str, before: int, after: int, at: float
) -> bool:
    cursor = await conn.execute(
        """UPDATE uploads SET received = %s, updated_at = %s
        WHERE id = %s AND received = %s AND completed_at IS NULL""",
        (after, at, upload_id, before),
    )
    return cursor.rowcount == 1


async def _add_reference(conn: AsyncConnection, sha256: str, wo: str, by: str, at: float) -> None:
    """`wo` references the content: whoever may see `wo` may download it."""
    await conn.execute(
        "INSERT INTO attachment_refs (sha256, wo, by, at) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (sha256, wo) DO NOTHING",
        (sha256, wo, by, at),
    )
