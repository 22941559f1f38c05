"""What every `AttachmentStore` backend must do: uploads and their durable offset, finished
content recorded once, and the work orders that reference it (which decide who may read it).
Each test runs once per entry of `backend`'s params: a new backend joins by adding one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any

import pycrdt
import pytest

from fieldsync.records import DocIndex, Origin, OriginKind
from fieldsync.storage import Attachment, AttachmentStore, Backend, Store, Upload, Write
from tests.storage.conftest import BackendFactory

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


Opener = Callable[[], AbstractAsyncContextManager[Backend]]


@pytest.fixture
def open_backend(make_backend: BackendFactory) -> Opener:
    """Opens the backend; each opening reaches the same data, so a test can reopen."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Backend]:
        backend = make_backend()
        assert isinstance(backend.attachments, AttachmentStore)
        await backend.open()
        try:
            yield backend
        finally:
            await backend.close()

    return opened


@pytest.fixture
def records(backend: Backend) -> AttachmentStore:
    return backend.attachments


def work_order(n: int, assignee: str | None, team: str | None, region: str | None) -> DocIndex:
    return DocIndex(f"wo:{n}", "wo", f"wo:{n}", assignee, team, region)


async def put_work_order(store: Store, index: DocIndex) -> None:
    ydoc: pycrdt.Doc[Any] = pycrdt.Doc()
    ydoc.get("body", type=pycrdt.Text).insert(0, index.doc)
    await store.append(
        Write(index.doc, ydoc.get_update(), Origin(OriginKind.DEVICE, "d-1"), "sam", index)
    )


def new_upload(
    upload_id: str = "u1", *, sha256: str = SHA_A, wo: str = "wo:1", length: int = 100
) -> Upload:
    return Upload(upload_id, "tina", wo, sha256, length, 0, "sha256 eA==", 1000.0)


def content(sha256: str = SHA_A, size: int = 100, by: str = "tina") -> Attachment:
    return Attachment(sha256, size, "image/png", 640, 480, 2000.0, by)


# Uploads


async def test_an_upload_is_kept_as_created(records: AttachmentStore) -> None:
    created = new_upload()
    await records.create_upload(created)
    assert await records.upload("u1") == created
    assert not created.complete
    assert await records.upload("u2") is None
    # An unfinished upload references nothing: its content is not readable through it.
    assert await records.readers([SHA_A]) == {}
    assert await records.attachment(SHA_A) is None


async def test_the_offset_moves_only_from_where_it_is(records: AttachmentStore) -> None:
    await records.create_upload(new_upload())
    assert await records.record_received("u1", 0, 40, 1001.0)
    assert (await records.upload("u1")) == replace(new_upload(), received=40)
    # A request that read the upload before another moved it loses, and changes nothing.
    assert not await records.record_received("u1", 0, 70, 1002.0)
    assert not await records.record_received("absent", 0, 10, 1002.0)
    assert (await records.upload("u1")) == replace(new_upload(), received=40)


async def test_two_writers_from_one_offset_one_wins(records: AttachmentStore) -> None:
    await records.create_upload(new_upload())
    moved = await asyncio.gather(
        *(records.record_received("u1", 0, after, 1001.0) for after in (10, 20, 30))
    )
    assert sorted(moved) == [False, False, True]
    current = await records.upload("u1")
    assert current is not None
    assert current.received == (10, 20, 30)[moved.index(True)]


async def test_completing_records_the_content_and_the_reference_together(
    backend: Backend, records: AttachmentStore
) -> None:
    await put_work_order(backend.store, work_order(1, "tina", "north", "east"))
    await records.create_upload(new_upload())
    assert await records.record_received("u1", 0, 60, 1001.0)
    # From a stale offset: nothing at all is written, neither content nor reference.
    assert not await records.complete_upload(new_upload(), 0, content(), 1002.0)
    assert await records.attachment(SHA_A) is None
    assert await records.readers([SHA_A]) == {}

    assert await records.complete_upload(new_upload(), 60, content(), 1002.0)
    done = await records.upload("u1")
    assert done == replace(new_upload(), received=100, completed_at=1002.0)
    assert done.complete
    assert await records.attachment(SHA_A) == content()
    assert await records.readers([SHA_A]) == {SHA_A: [work_order(1, "tina", "north", "east")]}
    # A complete upload takes no more chunks and cannot complete twice.
    assert not await records.record_received("u1", 100, 100, 1003.0)
    assert not await records.complete_upload(new_upload(), 60, content(), 1003.0)


async def test_content_is_recorded_once_and_referenced_by_each_work_order(
    backend: Backend, records: AttachmentStore
) -> None:
    orders = [work_order(2, "ulla", "south", "west"), work_order(1, "tina", "north", "east")]
    for index in orders:
        await put_work_order(backend.store, index)
    await records.create_upload(new_upload("u1", wo="wo:2"))
    assert await records.complete_upload(new_upload("u1", wo="wo:2"), 0, content(by="ulla"), 5.0)
    # The same content sent again, for another work order, by someone else.
    await records.create_upload(new_upload("u2", wo="wo:1"))
    assert await records.complete_upload(new_upload("u2", wo="wo:1"), 0, content(), 6.0)
    assert await records.attachment(SHA_A) == content(by="ulla")  # the first record stays
    assert await records.readers([SHA_A]) == {SHA_A: sorted(orders, key=lambda i: i.doc)}


async def test_an_upload_created_complete_references_its_content(
    backend: Backend, records: AttachmentStore
) -> None:
    """A device resending what it may already read: complete at creation, and its work order
    references the content from then on."""
    for n in (1, 3):
        await put_work_order(backend.store, work_order(n, "tina", "north", "east"))
    await records.create_upload(new_upload())
    assert await records.complete_upload(new_upload(), 0, content(), 2.0)
    resent = replace(new_upload("u2", wo="wo:3"), received=100, completed_at=3.0)
    await records.create_upload(resent)
    assert await records.upload("u2") == resent
    assert [index.doc for index in (await records.readers([SHA_A]))[SHA_A]] == ["wo:1", "wo:3"]


async def test_deleting_an_upload_keeps_its_content(
    backend: Backend, records: AttachmentStore
) -> None:
    await put_work_order(backend.store, work_order(1, "tina", "north", "east"))
    await records.create_upload(new_upload())
    assert await records.complete_upload(new_upload(), 0, content(), 2.0)
    await records.create_upload(new_upload("u2", sha256=SHA_B))
    assert await records.delete_upload("u2")
    assert await records.delete_upload("u1")
    assert not await records.delete_upload("u1")
    assert await records.upload("u1") is None
    assert await records.upload("u2") is None
    assert not await records.record_received("u2", 0, 10, 3.0)
    assert await records.attachment(SHA_A) == content()
    assert list(await records.readers([SHA_A, SHA_B])) == [SHA_A]


async def test_only_uploads_left_unfinished_and_idle_expire(records: AttachmentStore) -> None:
    for n, created_at in ((1, 10.0), (2, 5.0), (3, 30.0), (4, 1.0)):
        await records.create_upload(replace(new_upload(f"u{n}"), created_at=created_at))
    assert await records.record_received("u1", 0, 10, 20.0)  # touched since
    assert await records.complete_upload(new_upload("u4"), 0, content(), 2.0)  # finished
    assert await records.stale_uploads(15.0) == ["u2"]
    assert await records.stale_uploads(25.0) == ["u2", "u1"]  # oldest first
    assert await records.stale_uploads(25.0, limit=1) == ["u2"]
    assert not await records.expire_upload("u1", 15.0)  # a chunk arrived after 15
    assert not await records.expire_upload("u4", 100.0)  # complete: never expires
    assert await records.expire_upload("u2", 15.0)
    assert not await records.expire_upload("u2", 15.0)
    assert await records.upload("u2") is None
    assert await records.upload("u4") is not None
    assert await records.stale_uploads(100.0) == ["u1", "u3"]


# Who may read content


async def test_readers_answer_for_many_hashes_at_once(
    backend: Backend, records: AttachmentStore
) -> None:
    """A work order's screen asks about every hash its `attachments` map holds, at once."""
    north, south = work_order(1, "tina", "north", "east"), work_order(2, "ulla", "south", "west")
    for index in (north, south):
        await put_work_order(backend.store, index)
    hashes = [f"{n:064x}" for n in range(1200)]  # more than one statement's worth
    for n, sha256 in enumerate(hashes[:3] + hashes[-3:]):
        upload = new_upload(f"u{n}", sha256=sha256, wo=(north, south)[n % 2].doc)
        await records.create_upload(upload)
        assert await records.complete_upload(upload, 0, content(sha256), 2.0)
    found = await records.readers([*hashes, SHA_C])
    assert found == {
        sha256: [(north, south)[n % 2]] for n, sha256 in enumerate(hashes[:3] + hashes[-3:])
    }
    assert await records.readers([]) == {}


async def test_readers_follow_the_work_order_s_scope_as_it_changes(
    backend: Backend, records: AttachmentStore
) -> None:
    """Reassigning a work order moves who may read what it references."""
    await put_work_order(backend.store, work_order(1, "tina", "north", "east"))
    await records.create_upload(new_upload())
    assert await records.complete_upload(new_upload(), 0, content(), 2.0)
    await put_work_order(backend.store, work_order(1, "ulla", "south", "west"))
    assert await records.readers([SHA_A]) == {SHA_A: [work_order(1, "ulla", "south", "west")]}


async def test_everything_survives_a_reopen(open_backend: Opener) -> None:
    async with open_backend() as backend:
        await put_work_order(backend.store, work_order(1, "tina", "north", "east"))
        await backend.attachments.create_upload(new_upload())
        assert await backend.attachments.complete_upload(new_upload(), 0, content(), 2.0)
        await backend.attachments.create_upload(new_upload("u2", sha256=SHA_B))
        assert await backend.attachments.record_received("u2", 0, 30, 3.0)
    async with open_backend() as backend:
        records = backend.attachments
        assert await records.attachment(SHA_A) == content()
        assert list(await records.readers([SHA_A])) == [SHA_A]
        assert await records.upload("u2") == replace(new_upload("u2", sha256=SHA_B), received=30)
