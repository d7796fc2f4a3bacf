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


class OverwritesInputError(BertJaxError, ValueError):
    """An output path is one of the job's inputs, or lies inside an input folder."""


def check_output(flag: str, output: str | pathlib.Path, **inputs) -> pathlib.Path:
    """`output` as a path, after checking that it is none of `inputs` (flag name -> a file
    or folder, or a list of files) and lies inside no input folder: a job never writes over
    what it reads. Raises OverwritesInputError naming both flags."""
    out = pathlib.Path(output).resolve()
    for name, value in inputs.items():
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is None or "://" in str(p):
                continue
            real = pathlib.Path(p).resolve()
            if out == real or real in out.parents:
                raise OverwritesInputError(f"{flag}={output} would write over --{name}={p}: choose another "
                                           f"{flag} (a job never writes over one of its inputs)")
    return pathlib.Path(output)


def write_atomically(path: str | pathlib.Path, write) -> None:
    """`write(tmp)` into a temporary file beside `path`, then renamed over it: a crash or an
    error leaves the old file (or none), never half a file."""
    import os
    import tempfile
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(pathlib.Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
