"""Files on disk: content hashes (one file, a model's file list) and writes that never leave a partial file.

A file is written to a hidden temporary sibling, flushed to disk and renamed over the destination, so a
reader (or a crash) sees the old content or the new, never half of it. Folders are assembled the same way
(:func:`staged_folder`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import SafeguardError

PARTIAL = ".partial-"  # infix of the hidden temporary files and folders written beside a destination


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(files: Iterable[Mapping[str, Any]]) -> str:
    """The one hash over a model's files ({path, sha256, ...}, paths relative and "/"-separated): sha256 of the
    lines "PATH SHA256" joined by newlines, in path order (component by component, as sorted paths walk a
    folder, so "unet/config.json" comes before "unet.json"). Every recorded model carries this hash."""
    ordered = sorted(files, key=lambda f: str(f["path"]).split("/"))
    return hashlib.sha256("\n".join(f"{f['path']} {str(f['sha256']).lower()}" for f in ordered).encode()).hexdigest()


def write_atomically(path: str | os.PathLike, content: bytes | str, *, mode: int | None = None,
                     what: str = "the file") -> Path:
    """Write ``content`` (text as UTF-8) to ``path`` through a synced temporary sibling and a rename.

    An OSError becomes a one-line :class:`SafeguardError` naming the path; nothing is left beside it.
    """
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_umask())  # mkstemp's 0600 would hide it
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise SafeguardError(f"cannot write {what}: {exc.strerror or exc}", file=str(path),
                             fix="choose a writable path with free space") from None
    return path


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, *, what: str = "the folder") -> Iterator[Path]:
    """A new hidden folder beside ``out`` to assemble files in; removed if the block raises.

    The block moves it into place itself (see :func:`publish_folder`), since what happens to an existing
    ``out`` differs between callers.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL}", dir=out.parent))
    except OSError as exc:
        raise SafeguardError(f"cannot write {what}: {exc.strerror}", file=str(out.parent),
                             fix="choose a writable folder with free space") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sync_tree(root: Path) -> None:
    """fsync every file below ``root``, so a rename of ``root`` publishes content that is on disk."""
    for p in Path(root).rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def publish_folder(tmp: Path, out: Path) -> Path:
    """Sync a staged folder, make it readable like any folder, and rename it to ``out`` (which must not exist)."""
    sync_tree(tmp)
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide it from everyone else
    os.rename(tmp, out)
    return out


def _umask() -> int:
    return _UMASK


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any thread writes files
    os.umask(mask)
    return mask


_UMASK = _read_umask()
