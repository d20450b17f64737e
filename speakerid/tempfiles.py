"""The hidden ``.NAME.tmp-PID[.ext]`` files an atomic write leaves behind when its process is killed mid-write.

Writers put a file under that name, then ``os.replace`` it into place (:func:`atomic_write`); a kill in
between leaves the temporary. The next run removes those whose writer no longer runs, and leaves a live
writer's file alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO]:
    """A file to write ``path`` through: a hidden temporary beside it, fsynced and renamed to ``path`` when the
    block ends, so readers see the old file or the new one, never half. A block that raises renames nothing."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return True


def remove_dead_temporaries(directory: str | os.PathLike, names: Iterable[str], *, locked: bool = False) -> int:
    """Remove the temporaries of ``names`` (``det`` for ``.det.tmp-PID.png``) in ``directory`` whose writer is
    gone; how many. ``locked``: the caller holds the lock on these names (shardify), so every one is stale."""
    names = set(names)
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        match = TEMPORARY.match(path.name)
        if match is None or match["name"] not in names or not path.is_file():
            continue
        if locked or (int(match["pid"]) != os.getpid() and not pid_running(int(match["pid"]))):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        log.info("%s: removed %d temporary file(s) left by a killed run", directory, removed)
    return removed
