"""The directory table (`Directory`) on PostgreSQL: the same rows and rules as
`storage._directory`'s SQLite table, read and written through a `PostgresStore`'s pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection

from fieldsync.records import Person
from fieldsync.storage._directory import DirectoryChange
from fieldsync.storage._postgres import PostgresStore

__all__ = ["PostgresDirectory"]

_COLUMNS = "subject, name, mail, team, region, supervisor, enabled"


def _person(row: Sequence[Any]) -> Person:
    subject, name, mail, team, region, supervisor, enabled = row
    return Person(subject, name, mail, team, region, supervisor, bool(enabled))


class PostgresDirectory:
    """`Directory` on the tables of a `PostgresStore`."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store

    async def replace(self, people: Sequence[Person], now: float) -> DirectoryChange:
        wanted = {person.subject: person for person in people}
        if len(wanted) != len(people):
            raise ValueError("a subject appears twice")

        async def work(conn: AsyncConnection) -> DirectoryChange:
            # One replace at a time: two nodes syncing the directory at once take turns.
            await conn.execute("LOCK TABLE directory_people IN SHARE ROW EXCLUSIVE MODE")
            cursor = await conn.execute(f"SELECT {_COLUMNS} FROM directory_people")
            held = {row[0]: _person(row) for row in await cursor.fetchall()}
            changed = [person for subject, person in wanted.items() if held.get(subject) != person]
            changed += [
                Person(old.subject, old.name, old.mail, old.team, old.region, old.supervisor, False)
                for subject, old in held.items()
                if subject not in wanted and old.enabled
            ]
            async with conn.cursor() as writer:
                await writer.executemany(
                    f"""INSERT INTO directory_people ({_COLUMNS}, updated_at)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (subject) DO UPDATE SET
                        name = excluded.name, mail = excluded.mail, team = excluded.team,
                        region = excluded.region, supervisor = excluded.supervisor,
                        enabled = excluded.enabled, updated_at = excluded.updated_at""",
                    [
                        (p.subject, p.name, p.mail, p.team, p.region, p.supervisor, p.enabled, now)
                        for p in changed
                    ],
                )
            return DirectoryChange(changed, len(held.keys() | wanted.keys()))

        return await self._store.run(work)

    async def person(self, subject: str) -> Person | None:
        async def read(conn: AsyncConnection) -> Person | None:
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM directory_people WHERE subject = %s", (subject,)
            )
            row = await cursor.fetchone()
            return _person(row) if row else None

        return await self._store.query(read)

    async def people(self) -> list[Person]:
        async def read(conn: AsyncConnection) -> list[Person]:
            cursor = await conn.execute(f"SELECT {_COLUMNS} FROM directory_people ORDER BY subject")
            return [_person(row) for row in await cursor.fetchall()]

        return await self._store.query(read)

    async def members(
        self, team: str, *, region: str | None = None, after: str | None = None, limit: int
    ) -> list[Person]:
        async def read(conn: AsyncConnection) -> list[Person]:
            cursor = await conn.execute(
                f"""SELECT {_COLUMNS} FROM directory_people
                WHERE team = %(team)s AND enabled AND subject > %(after)s
                  AND (%(region)s::text IS NULL OR region = %(region)s)
                ORDER BY subject LIMIT %(limit)s""",
                {"team": team, "region": region, "after": after or "", "limit": limit},
            )
            return [_person(row) for row in await cursor.fetchall()]

        return await self._store.query(read)
