"""Exclusive file locks for caches that several processes share (POSIX ``flock``).

:func:`exclusive_lock` serialises the processes that build or read a shared cache (the
built-in synthetic data, the image-check cache of COCO registration): the first one builds
it, the others wait and then find it built. The kernel releases the lock when its holder
exits or is killed, so a crashed builder never blocks the next run. On NFS, Linux maps
``flock`` to POSIX locks, which work across machines (NFSv4, or v3 with lockd).
"""
import contextlib
import fcntl
import logging
import os
import time
from typing import Iterator

__all__ = ["exclusive_lock"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive_lock(path: "os.PathLike[str] | str", what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) while the block runs.

    Waits for the process holding it, logging once that it waits (``what`` names the cache,
    e.g. "the synthetic dataset cache /x"). The lock file is left in place (empty). Where no
    lock can be had (a read-only folder, a file system without locks) the block runs without
    one, with a warning: nothing can be built in a read-only cache, and reading needs no lock.
    """
    path = os.fspath(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        logger.warning("Cannot create the lock %s (%s): using %s without a lock", path, e, what)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process that builds %s (lock %s)", what, path)
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            logger.info("Waited %.1f s for %s", time.monotonic() - start, what)
        except OSError as e:  # e.g. ENOLCK: no locks on this file system
            logger.warning("Cannot lock %s (%s): using %s without a lock", path, e, what)
        yield
    finally:
        os.close(fd)  # releases the lock
