"""Thumbnails of photos for the supervisors' screens, made in bounded memory and cached.

Decoding is where an image costs memory, and a small file can decode to a great deal (security
finding 4: one 250 KB PNG of 8000 x 8000 took a server from 95 to 769 MiB). So each thumbnail's
peak is read from the image's header first (`_media.thumbnail_cost`), and one that would hold
more than `memory` bytes is refused before anything is decoded, with `no_thumbnail`. Thumbnails
are made one at a time, whatever the number of supervisors, on one thread of their own: glibc
gives each thread that allocates an arena of its own and keeps what is freed there, so images
decoded on two threads would keep twice the memory of one. The same photo asked for by many at
once is made once.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from fieldsync.attachments import _media
from fieldsync.attachments._blobs import Blobs
from fieldsync.attachments._media import MediaType, ThumbnailTooLarge

__all__ = ["Thumbnails"]

log = logging.getLogger(__name__)


class Thumbnails:
    def __init__(self, blobs: Blobs, *, max_pixels: int, memory: int) -> None:
        self._blobs = blobs
        self._max_pixels = max_pixels
        self.memory = memory
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="thumbnails")
        self._making: dict[str, asyncio.Task[bytes]] = {}

    async def get(self, sha256: str, media: MediaType) -> bytes:
        """The thumbnail of stored image content: from the cache, or made now. Raises
        `ThumbnailTooLarge` for an image whose decoding would take more than the budget, and
        what Pillow raises for one it cannot render."""
        cached = await asyncio.to_thread(self._blobs.read_thumbnail, sha256)
        if cached is not None:
            return cached
        making = self._making.get(sha256)
        if making is None:
            making = asyncio.create_task(self._make(sha256, media), name="thumbnail")
            self._making[sha256] = making
            making.add_done_callback(lambda done: self._made(sha256, done))
        # A requester that goes away leaves the making to finish: its memory stays reserved
        # until the decoding thread is done with it, and the cache gets the result.
        return await asyncio.shield(making)

    async def close(self) -> None:
        """Wait for the thumbnails being made (a worker thread cannot be interrupted)."""
        await asyncio.gather(*self._making.values(), return_exceptions=True)
        self._renderer.shutdown()

    async def _make(self, sha256: str, media: MediaType) -> bytes:
        path = self._blobs.path(sha256)
        cost = await asyncio.to_thread(_media.thumbnail_cost, path, media, self._max_pixels)
        if cost > self.memory:
            raise ThumbnailTooLarge(cost, self.memory)
        made = await asyncio.get_running_loop().run_in_executor(
            self._renderer, _media.thumbnail, path, media, self._max_pixels, self.memory
        )
        await asyncio.to_thread(self._blobs.write_thumbnail, sha256, made)
        log.info("thumbnail of %s… made, holding %d KiB while decoding", sha256[:12], cost >> 10)
        return made

    def _made(self, sha256: str, done: asyncio.Task[bytes]) -> None:
        self._making.pop(sha256, None)
        if not done.cancelled():
            done.exception()  # read here too: every requester may have gone
