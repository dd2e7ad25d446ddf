"""Atomic, durable file output: every file or folder the project writes appears whole or not at all.

One mechanism for all of them: write under a temporary name beside the target, ``fsync`` it, rename it into place,
``fsync`` the parent folder. A folder that replaces an older one is swapped with :func:`replace_dir`, which refuses a
non-empty target that is not the same kind of output (so ``--out`` pointed at the wrong folder never deletes it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from hci_atr.errors import DataError

# A folder counts as "its own kind" when this returns True for it (e.g. it holds the kind's manifest file).
OwnCheck = Callable[[Path], bool]


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or folder's contents to stable storage (a folder: its entries, i.e. renames into it)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # e.g. a filesystem that cannot open folders: nothing more can be done portably
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder under ``root`` (a staged folder, before it is renamed into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it and rename it into place (readers never see a partial
    file, and a crash right after the call cannot leave an empty one)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        fsync_path(p.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def marker_check(*names: str) -> OwnCheck:
    """An :data:`OwnCheck` that recognises a folder by one of these marker files."""
    return lambda p: any((p / n).is_file() for n in names)


def check_replaceable(dst: str | os.PathLike, own: OwnCheck | None, what: str) -> None:
    """Refuse to replace ``dst`` when it exists and is not empty and ``own`` does not recognise it as ``what``."""
    p = Path(dst)
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir() or p.is_symlink():
        raise DataError(f"{p}: exists and is not a folder; choose another output path")
    if own is None or own(p):
        return
    if any(p.iterdir()):
        raise DataError(f"{p}: exists, is not empty and is not {what}; choose another output folder "
                        f"(nothing was deleted)")


def replace_dir(tmp: str | os.PathLike, dst: str | os.PathLike, own: OwnCheck | None = None,
                what: str = "an output of this command") -> Path:
    """Swap the finished folder ``tmp`` into place at ``dst`` (readers never see a half-written ``dst``).

    ``os.replace`` cannot overwrite a non-empty folder, so an existing ``dst`` is renamed aside first and removed
    after the swap; with ``own``, a non-empty ``dst`` that is not this kind of output is refused instead
    (:func:`check_replaceable`). ``tmp`` must be on the same filesystem as ``dst`` (make it beside ``dst``).
    """
    tmp, dst = Path(tmp), Path(dst)
    check_replaceable(dst, own, what)
    fsync_tree(tmp)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_path(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


@contextlib.contextmanager
def staged_dir(dst: str | os.PathLike, own: OwnCheck | None = None,
               what: str = "an output of this command") -> Iterator[Path]:
    """``with staged_dir(out) as tmp: write into tmp`` -> ``tmp`` replaces ``out`` on success, is removed on error.

    The target is checked before any work starts, so a refused ``--out`` costs nothing.
    """
    dst = Path(dst)
    check_replaceable(dst, own, what)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        replace_dir(tmp, dst, own, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir_atomic(src: str | os.PathLike, dst: str | os.PathLike, own: OwnCheck | None = None,
                    what: str = "an output of this command") -> Path:
    """Copy a folder to ``dst`` atomically (copy to a staged sibling, then swap it into place)."""
    with staged_dir(dst, own, what) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)
