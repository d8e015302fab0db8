"""Errors raised by the store. Every message names the store (and the array/chunk where there is one)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class for everything the store raises on bad input or a bad store."""


class StoreNotFoundError(StoreError):
    """The url/path is not a vlcache store (or not yet a finished one)."""


class StoreBeingCreatedError(StoreNotFoundError):
    """The store's creation is in progress, or was interrupted (a writer redoes it)."""


class SchemaVersionError(StoreError):
    """The store was written by a newer vlcache than this one."""


class ReadOnlyStoreError(StoreError):
    """A write to a complete (or read-only opened) store."""


class ConfigMismatchError(StoreError):
    """A writer was asked to resume a store created with a different extraction config."""


class CorruptChunkError(StoreError):
    """A chunk failed its checksum or could not be decoded; never returned as silent garbage."""

    def __init__(self, url: str, array: str, chunk: tuple[int, ...], reason: str = "failed its checksum"):
        self.url = url
        self.array = array
        self.chunk = tuple(int(c) for c in chunk)
        self.reason = reason
        super().__init__(
            f"store {url}: array '{array}' chunk {self.chunk} {reason} — run `vlcache store verify {url}`"
        )

    def __reduce__(self):  # keep it picklable across DataLoader workers
        return (type(self), (self.url, self.array, self.chunk, self.reason))
