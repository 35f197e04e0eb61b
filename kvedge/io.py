"""Files kvedge writes, written so that nothing is ever half there: a reader sees the old file or the new
one (`atomic_write_*`, `atomic_path`), a folder gets all its files or none (`write_folder`), and a write
that cannot fit is refused before it starts (`check_space`). Every writer of reports, adapters, patched
models and deployment folders goes through here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

from .errors import KvedgeError, StoreError

SPACE_MARGIN = 1 << 20  # bytes left free beyond what a write needs


def _remove(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to (by any writer: gguf-py's, numpy's); when the block ends
    without an exception it is synced and renamed onto `path`, otherwise removed. mkstemp makes files
    owner-only; what kvedge writes is meant to be read by others, so it becomes 0644."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"disk full while writing {path}") from None
        raise StoreError(f"cannot write {path}: {exc.strerror or exc}") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def free_bytes(folder: str | Path) -> int:
    """Free space where `folder` (or its nearest existing parent) lives."""
    p = Path(folder)
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_space(folder: str | Path, needed: int, what: str, error: type[KvedgeError] = StoreError) -> None:
    """`error` unless `needed` bytes (and a margin) fit where `folder` lives."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN:
        raise error(f"not enough free space in {folder} for {what}: needs {needed / 2**20:.1f} MiB, "
                    f"{free / 2**20:.1f} MiB free")


def check_new_folder(out: str | Path, error: type[KvedgeError], flag: str = "--out") -> None:
    """`out` must be new or empty, and writable: tried, not assumed (root ignores modes)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise error(f"{flag} {out} exists and is not an empty folder: choose a new one")
    probe = out if out.exists() else out.parent
    while not probe.exists():
        probe = probe.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kvedge-probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise error(f"cannot write in {probe}: {exc.strerror or exc}") from None


def write_folder(out: str | Path, files: Mapping[str, bytes | Path], last: str,
                 finish: Callable[[Path], bytes], error: type[KvedgeError]) -> list[Path]:
    """Fill the new or empty folder `out` with `files` (name -> bytes, or a file to copy), then `last`,
    whose bytes `finish(stage)` makes once every other file is staged (a manifest can hash them). Files
    are staged in a hidden folder inside `out` and renamed into place, `last` at the end, so a reader who
    finds `last` finds everything. On failure nothing is kept, and `out` is removed again if this call
    created it; the failure is `error` with one line."""
    out = Path(out)
    check_new_folder(out, error)
    needed = sum(v.stat().st_size if isinstance(v, Path) else len(v) for v in files.values()) + 2**16
    check_space(out, needed, f"the files of {out.name}", error)
    created = not out.exists()
    stage = out / f".kvedge-stage-{os.getpid()}.tmp"
    placed: list[Path] = []
    try:
        stage.mkdir(parents=True)
        for name, content in files.items():
            dst = stage / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
            _fsync(dst)
            if name.endswith(".sh"):
                dst.chmod(0o755)
        (stage / last).write_bytes(finish(stage))
        for name in [*files, last]:
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, target)
            placed.append(target)
        shutil.rmtree(stage)
        return placed
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        for p in placed:
            _remove(p)
        for sub in sorted({p.parent for p in placed if p.parent != out}, reverse=True):
            with contextlib.suppress(OSError):
                sub.rmdir()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise error(f"cannot write {out}: {exc.strerror or exc}; nothing was kept") from None
