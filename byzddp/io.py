"""Writing run files so that a crash, a full disk or a read-only folder never leaves half a file.

`write_atomic` writes to a temporary name in the same folder and renames it over the target,
so a reader sees the old file or the new one, never a mix. On any failure the temporary file
is removed and `OutputError` names the file, the operating system's reason and the fix.
A leaf module: it imports nothing from byzddp.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union


class OutputError(Exception):
    """A run file could not be written (full disk, read-only or missing folder)."""


def describe(path, error: OSError) -> str:
    reason = error.strerror or str(error) or type(error).__name__
    return f"could not write {path}: {reason}; free space or move log.dir to a writable folder"


def write_atomic(path: Union[str, Path], data: Union[bytes, str], fsync: bool = False) -> None:
    """Replace `path` by `data` in one rename; `fsync` also flushes it to the disk first
    (checkpoints: a power cut must not leave a renamed but empty file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with os.fdopen(_create_new(tmp), "wb") as fh:
            fh.write(payload)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:     # also KeyboardInterrupt mid-write: no temporary left behind
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(describe(path, e)) from None
        raise


def _create_new(tmp: Path) -> int:
    """A descriptor on a file made new at `tmp`. The name is predictable, so something may
    already lie there (a temporary a killed run left, or a symbolic link planted in a shared
    folder): O_EXCL never opens it, let alone writes through a link; it is removed (a link
    itself, not what it points to) and the file made anew."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(tmp, flags, 0o666)
    except FileExistsError:
        os.unlink(tmp)
        return os.open(tmp, flags, 0o666)


def append_line(path: Union[str, Path], line: str) -> None:
    """Append one whole line (metrics.jsonl) or nothing: a full disk can take part of a write,
    so on any failure the file is cut back to its length before, and OutputError names it.
    (A process killed mid-write can still leave a torn tail; a resumed run rewrites the file.)"""
    payload = (line if line.endswith("\n") else line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise OutputError(describe(path, e)) from None
    try:
        before = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(payload):     # a short write (the disk filled) then fails on the rest
                done += os.write(fd, payload[done:])
        except BaseException as e:
            try:
                os.ftruncate(fd, before)   # drop the part that was written: whole or absent
            except OSError:
                pass
            if isinstance(e, OSError):
                raise OutputError(describe(path, e)) from None
            raise
    finally:
        os.close(fd)
