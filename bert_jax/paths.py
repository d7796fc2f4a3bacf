"""Which files reading a model or tokenizer folder may touch: only those that resolve
inside the folder. A Hugging Face cache snapshot (`.../snapshots/<revision>/`) links its
files into the cache's `blobs/`, so that folder is allowed for a snapshot too. A symlink,
`../` or absolute path that leads anywhere else is refused by name, so a crafted folder
cannot make a job read (or copy into its output) a file from elsewhere on the machine."""

from __future__ import annotations

import pathlib

from bert_jax.errors import BertJaxError


class OutsideFolderError(BertJaxError, ValueError):
    """A file named by a model or tokenizer folder resolves outside it."""


def allowed_roots(folder: str | pathlib.Path) -> list[pathlib.Path]:
    real = pathlib.Path(folder).resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # Hugging Face cache: models--org--name/snapshots/<rev>
        roots.append(real.parent.parent / "blobs")
    return roots


def inside(folder: str | pathlib.Path, name: str | pathlib.Path) -> pathlib.Path:
    """folder / name, after checking that it resolves inside `folder` (or the blobs/ of a
    cache snapshot); raises OutsideFolderError naming both otherwise."""
    path = pathlib.Path(folder) / name
    real = path.resolve()
    if not any(real == r or r in real.parents for r in allowed_roots(folder)):
        raise OutsideFolderError(f"{path} resolves to {real}, outside the folder {folder}; refusing to read it")
    return path
