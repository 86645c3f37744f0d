"""WebDataset-style tar shards: members `{key}.{ext}`, grouped by key in member order."""

from __future__ import annotations

import io
import queue
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path


class ShardError(RuntimeError):
    """A shard cannot be opened or read as a tar archive."""


class ShardWriter:
    """Writes samples into one tar; metadata is fixed so equal inputs give equal bytes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard key {key!r} must not contain '.' or '/'")
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
            self._tar.addfile(info, io.BytesIO(members[ext]))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample; a shard that is not a readable tar raises ShardError."""
    path = Path(path)
    try:
        tar = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"cannot open shard {path}: {e}") from e
    with tar:
        key, members = None, {}
        try:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                k, _, ext = name.partition(".")
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                members[ext] = tar.extractfile(info).read()
        except (OSError, tarfile.TarError, EOFError) as e:
            raise ShardError(f"shard {path} is damaged after key {key!r}: {e}") from e
        if key is not None:
            yield key, members


def prefetch(items: Iterator, depth: int = 64) -> Iterator:
    """Run `items` in a background thread, up to `depth` ahead, so tar reading overlaps decoding.

    Exceptions are re-raised in the consumer; when the consumer stops early the thread stops too.
    """
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            put((None, err))
            return
        put((done, None))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
