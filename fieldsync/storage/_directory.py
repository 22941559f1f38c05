"""The directory table (DESIGN.md §7): the organisation's people as the directory adapter last
read them, kept so that principals are enriched and deprovisioned from a local copy that
survives the directory being unreachable and the server restarting.

A person the directory no longer lists is kept, disabled: their tokens stay refused until they
expire (a row that vanished would make them an unknown subject, whom nothing refuses).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlite_utils import Database

from fieldsync.records import Person

if TYPE_CHECKING:  # `_sqlite` imports the migrations, which import SCHEMA from here
    from fieldsync.storage._sqlite import Transaction

_T = TypeVar("_T")

__all__ = ["SCHEMA", "Directory", "DirectoryChange", "SQLiteDirectory"]


@dataclass(frozen=True, slots=True)
class DirectoryChange:
    """What one `replace` changed: each person whose row differs, as they now are (a deleted one
    disabled), and how many rows were written."""

    changed: list[Person]
    people: int  # rows after the change, disabled ones included


class Directory(Protocol):
    """The directory table of a store. Every method is safe to call on the event loop."""

    async def replace(self, people: Sequence[Person], now: float) -> DirectoryChange:
        """Make the table what the directory answered: `people` written, everyone else of the
        table disabled; in one transaction. `people` must not repeat a subject."""
        ...

    async def person(self, subject: str) -> Person | None: ...

    async def people(self) -> list[Person]:
        """Everyone, disabled people included, by subject."""
        ...

    async def members(
        self, team: str, *, region: str | None = None, after: str | None = None, limit: int
    ) -> list[Person]:
        """The enabled people of `team` (of `region` only, when given), by subject, after the
        subject `after`."""
        ...


SCHEMA = (
    """CREATE TABLE directory_people (
        subject TEXT PRIMARY KEY,
        name TEXT,
        mail TEXT,
        team TEXT,
        region TEXT,
        supervisor TEXT,
        enabled INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )""",
    # A team's members, for a supervisor's screen.
    "CREATE INDEX directory_people_team ON directory_people (team, subject)",
)

_COLUMNS = "subject, name, mail, team, region, supervisor, enabled"


def _person(row: Any) -> Person:
    subject, name, mail, team, region, supervisor, enabled = row
    return Person(subject, name, mail, team, region, supervisor, bool(enabled))


def _row(person: Person) -> tuple[Any, ...]:
    return (
        person.subject,
        person.name,
        person.mail,
        person.team,
        person.region,
        person.supervisor,
        int(person.enabled),
    )


class _Tables(Protocol):
    """What `SQLiteDirectory` needs of the store (`SQLiteStore` is one)."""

    def transact(self, work: Callable[[Transaction], _T]) -> Awaitable[_T]: ...

    async def query(self, read: Callable[[Database], _T]) -> _T: ...


class SQLiteDirectory:
    """The `Directory` of a `SQLiteStore`: writes through its writer, reads on its readers."""

    def __init__(self, store: _Tables) -> None:
        self._store = store

    async def replace(self, people: Sequence[Person], now: float) -> DirectoryChange:
        wanted = {person.subject: person for person in people}
        if len(wanted) != len(people):
            raise ValueError("a subject appears twice")

        def work(txn: Transaction) -> DirectoryChange:
            db = txn.db
            held = {
                row[0]: _person(row)
                for row in db.execute(f"SELECT {_COLUMNS} FROM directory_people")
            }
            changed = [person for subject, person in wanted.items() if held.get(subject) != person]
            changed += [
                Person(old.subject, old.name, old.mail, old.team, old.region, old.supervisor, False)
                for subject, old in held.items()
                if subject not in wanted and old.enabled
            ]
            db.conn.executemany(
                f"INSERT OR REPLACE INTO directory_people ({_COLUMNS}, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(*_row(person), now) for person in changed],
            )
            return DirectoryChange(changed, len(held.keys() | wanted.keys()))

        return await self._store.transact(work)

    async def person(self, subject: str) -> Person | None:
        def read(db: Database) -> Person | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM directory_people WHERE subject = ?", (subject,)
            ).fetchone()
            return _person(row) if row else None

        return await self._store.query(read)

    async def people(self) -> list[Person]:
        def read(db: Database) -> list[Person]:
            rows = db.execute(f"SELECT {_COLUMNS} FROM directory_people ORDER BY subject")
            return [_person(row) for row in rows]

        return await self._store.query(read)

    async def members(
        self, team: str, *, region: str | None = None, after: str | None = None, limit: int
    ) -> list[Person]:
        def read(db: Database) -> list[Person]:
            rows = db.execute(
                f"""SELECT {_COLUMNS} FROM directory_people
                WHERE team = :team AND enabled = 1 AND subject > :after
                  AND (:region IS NULL OR region = :region)
                ORDER BY subject LIMIT :limit""",
                {"team": team, "region": region, "after": after or "", "limit": limit},
            )
            return [_person(row) for row in rows]

        return await self._store.query(read)
