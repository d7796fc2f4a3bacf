"""Paths of workdirs, corpora and checkpoints: one type for local folders and object stores.

`path(p)` gives an `etils.epath.Path` for a URI (gs://, s3://, az://, hf:// — the type
orbax itself uses, so checkpoints go to the store directly) and a `pathlib.Path` for a local
path; both have the pathlib API, so code that reads and writes through `path(...)` works on
either. Where a store needs more than that API, the helpers here do it:
- object stores have no append and no rename of folders: a writer of lines keeps them and
  rewrites the object (runlog.RunLog); `replace_tree` uploads a folder written locally;
- libraries that need real files (the tokenizers library, memory-mapped corpus arrays) get a
  local copy (`copy_tree` into a local folder) or a clear error naming the flag
  (`require_local`).
The object-store backend (gcsfs, s3fs, ...) is whatever the environment provides (fsspec);
nothing here imports one.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
from typing import Union

from etils import epath

from bert_jax.errors import BertJaxError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
AnyPath = Union[pathlib.Path, epath.Path]


class StorageError(BertJaxError, ValueError):
    """A path that must be local is an object-store URI, or a URI no backend serves."""


def is_remote(p) -> bool:
    """Whether `p` is an object-store URI (gs://bucket/...), not a local path."""
    if isinstance(p, pathlib.PurePath) and not isinstance(p, epath.Path):
        return False
    return bool(_URI.match(os.fspath(p)))


def path(p) -> AnyPath:
    """The path type for `p`: epath.Path for a URI, pathlib.Path otherwise."""
    if is_remote(p):
        return p if isinstance(p, epath.Path) else epath.Path(os.fspath(p))
    return pathlib.Path(p)


def resolve(p) -> AnyPath:
    """An absolute form of `p` (a URI is absolute already)."""
    p = path(p)
    return p if is_remote(p) else p.resolve()


def glob(pattern: str) -> list[AnyPath]:
    """Files and folders matching a glob (`**` recursive), sorted; for a URI the pattern's
    folder part (up to the first component with a wildcard) is listed by the store."""
    if not is_remote(pattern):
        import glob as glob_lib
        return [pathlib.Path(h) for h in sorted(glob_lib.glob(pattern, recursive=True))]
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    k = next((i for i, c in enumerate(parts) if any(ch in c for ch in "*?[")), len(parts))
    base = epath.Path(f"{scheme}://" + "/".join(parts[:k]))
    if k == len(parts):
        return [base] if base.exists() else []
    return sorted(base.glob("/".join(parts[k:])), key=os.fspath)


def size_and_mtime(p) -> tuple[int, int]:
    """(bytes, modification time in ns) of a file, local or on a store."""
    p = path(p)
    if not is_remote(p):
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    st = p.stat()
    return int(st.length), int(float(st.mtime or 0) * 1e9)


def require_local(p, flag: str, why: str) -> pathlib.Path:
    """`p` as a local pathlib.Path, or StorageError naming the flag when it is a URI."""
    if is_remote(p):
        raise StorageError(f"{flag}={p}: {why}, so it must be a local folder (the workdir and the "
                           "corpus may be on an object store)")
    return pathlib.Path(p)


def rmtree(p) -> None:
    """Remove a folder and its contents if it exists."""
    p = path(p)
    if is_remote(p):
        if p.exists():
            p.rmtree()
    else:
        shutil.rmtree(p, ignore_errors=True)


def copy_tree(src, dest) -> None:
    """Copy folder `src` into `dest` file by file (either side local or remote)."""
    src, dest = path(src), path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            copy_tree(child, dest / child.name)
        else:
            (dest / child.name).write_bytes(child.read_bytes())


def move_tree(src, dest) -> None:
    """Rename folder `src` to `dest` (on an object store: copied, then removed)."""
    src, dest = path(src), path(dest)
    if is_remote(src) or is_remote(dest):
        copy_tree(src, dest)
        rmtree(src)
    else:
        src.rename(dest)


def replace_tree(dest, write) -> None:
    """Replace folder `dest` with what `write(folder)` writes. Locally it is written into
    dest.tmp and renamed over dest (a crash leaves the old folder or the new one). On an
    object store, which renames a folder object by object, it is written into a local
    temporary folder and uploaded to dest.tmp, then dest is replaced by that copy; a crash
    before the end leaves dest.tmp incomplete and dest as it was or absent."""
    dest = path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    rmtree(tmp)
    if not is_remote(dest):
        write(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return
    with tempfile.TemporaryDirectory(prefix="bert_jax_upload_") as local:
        write(pathlib.Path(local) / dest.name)
        copy_tree(pathlib.Path(local) / dest.name, tmp)
    rmtree(dest)
    copy_tree(tmp, dest)
    rmtree(tmp)


def local_folder(p) -> pathlib.Path:
    """`p` itself when local; for a URI, a local copy of the folder in a temporary folder
    removed when the process exits (for libraries that read real files: a tokenizer, a
    transformers checkpoint)."""
    p = path(p)
    if not is_remote(p):
        return p
    global _DOWNLOADS
    if _DOWNLOADS is None:
        _DOWNLOADS = tempfile.TemporaryDirectory(prefix="bert_jax_download_")
    local = pathlib.Path(tempfile.mkdtemp(dir=_DOWNLOADS.name)) / p.name
    copy_tree(p, local)
    return local


_DOWNLOADS: tempfile.TemporaryDirectory | None = None


def slug(p) -> str:
    """A file name standing for path or URI `p` (for its local copies)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.fspath(p)).strip("_")


class RewritingFile:
    """A binary file on an object store that is written by appending (TensorBoard's event
    file): the bytes stay in memory and every flush rewrites the whole object, so the store
    holds everything up to the last flush. (No `fileno`: writers that fsync skip it.)"""

    def __init__(self, p):
        self.path, self.buf, self.closed = path(p), bytearray(), False

    def write(self, b) -> int:
        self.buf += bytes(b)
        return len(b)

    def flush(self) -> None:
        if not self.closed:
            self.path.write_bytes(bytes(self.buf))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _EventFiles:
    """tensorboardX's writer factory for URIs, through the same path type as the rest."""

    def open(self, p):
        return RewritingFile(p)

    def directory_check(self, p):
        path(p).mkdir(parents=True, exist_ok=True)


def register_tensorboard() -> None:
    """Let tensorboardX write event files to every URI scheme `path` serves (its own gs://
    writer needs google-cloud-storage; this one uses the environment's fsspec backend)."""
    from tensorboardX import record_writer
    for scheme in ("gs", "s3", "az"):
        record_writer.register_writer_factory(scheme, _EventFiles())
