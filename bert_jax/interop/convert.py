"""Hugging Face <-> bert_jax checkpoints, for every family and head (the `convert` job
is jobs/convert.py).

Python API: `load(folder)` reads either kind of folder into (config, task, params,
tokenizer folder); `save_ours` / `save_hf` write them. Only safetensors are read or
written (a folder with only pytorch_model.bin is refused: loading it would unpickle).
Writes go to a temporary folder renamed into place, so a failure leaves nothing partial
in the output folder.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from bert_jax import checkpoint, paths, storage
from bert_jax.data.tokenizer import copy_files as copy_tokenizer_files
from bert_jax.errors import BertJaxError
from bert_jax.interop import rename
from bert_jax.model import objectives
from bert_jax.model.config import ModelConfig

# transformers architecture name -> our task
# transformers class -> (family, task, pretraining objective or None).
ARCHITECTURES = {}
for _fam, _Fam in (("bert", "Bert"), ("roberta", "Roberta"), ("albert", "Albert")):
    ARCHITECTURES.update({
        f"{_Fam}Model": (_fam, "base", None),
        f"{_Fam}ForSequenceClassification": (_fam, "sequence_classification", None),
        f"{_Fam}ForTokenClassification": (_fam, "token_classification", None),
        f"{_Fam}ForQuestionAnswering": (_fam, "question_answering", None),
    })
for _obj in objectives.OBJECTIVES.values():  # each objective's class per family
    ARCHITECTURES.update({cls: (fam, "pretraining", _obj.name) for fam, (cls, _) in _obj.hf.items()})
_HF_CLASS = {(f, t, o): a for a, (f, t, o) in ARCHITECTURES.items()}


def hf_architecture(cfg: ModelConfig, task: str) -> str:
    """The transformers class that holds `task` of `cfg` (pretraining: the objective's
    heads); refuses by name when none does."""
    name = _HF_CLASS.get((cfg.family, task, cfg.objective if task == "pretraining" else None))
    if name is None:
        try:
            rename.hf_entries(cfg, task)  # names the head no class holds
        except rename.RenameError as e:
            raise ConvertError(str(e)) from None
        raise ConvertError(f"no Hugging Face class holds {cfg.family}/{task}")
    return name
MAX_SHARD_BYTES = 2 * 2**30
LABELS_FILE = "labels.json"


class ConvertError(BertJaxError, ValueError):
    """The folder cannot be converted; the message names the file or tensor."""


# ------------------------------------------------------------------ HF -> arrays ----
def read_safetensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    try:
        if single.exists():
            return load_file(str(paths.inside(folder, single.name)))
        if index.exists():
            files = sorted(set(json.loads(paths.inside(folder, index.name).read_text())["weight_map"].values()))
            out = {}
            for f in files:
                shard = paths.inside(folder, f)  # no ../, absolute path or symlink out of the folder
                if not shard.is_file():
                    raise ConvertError(f"{index} names shard {f}, which is missing")
                out.update(load_file(str(shard)))
            return out
    except paths.OutsideFolderError as e:
        raise ConvertError(f"{index if index.exists() else single}: {e}") from None
    if any((folder / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ConvertError(f"{folder} has only pytorch_model.bin: bert_jax never loads pickle files. "
                           "Convert it to safetensors first (transformers: "
                           "model.save_pretrained(dir, safe_serialization=True)).")
    raise ConvertError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def load_hf(folder: str | pathlib.Path) -> tuple[ModelConfig, str, dict, dict]:
    """(config, task, params, hf config dict) from a transformers folder."""
    folder = pathlib.Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ConvertError(f"{cfg_path} is missing")
    try:
        d = json.loads(paths.inside(folder, "config.json").read_text())
    except paths.OutsideFolderError as e:
        raise ConvertError(str(e)) from None
    arch = (d.get("architectures") or [None])[0]
    if arch is None:
        fam = d.get("model_type")
        arch = {"bert": "BertModel", "roberta": "RobertaModel", "albert": "AlbertModel"}.get(fam)
    if arch not in ARCHITECTURES:
        raise ConvertError(f"{cfg_path}: architecture {arch!r} (model_type {d.get('model_type')!r}) "
                           f"is not supported; supported: {sorted(ARCHITECTURES)}")
    family, task, objective = ARCHITECTURES[arch]
    try:
        cfg = rename.config_from_hf(d, **({"objective": objective} if objective else {}))
    except (ValueError, rename.RenameError) as e:
        raise ConvertError(f"{cfg_path}: {e}") from None
    tensors = read_safetensors(folder)
    emb = next((v for k, v in tensors.items() if k.endswith("embeddings.word_embeddings.weight")), None)
    if emb is not None and emb.shape[0] != cfg.vocab_size:
        raise ConvertError(f"{cfg_path}: vocab_size={cfg.vocab_size} disagrees with the embedding "
                           f"matrix embeddings.word_embeddings.weight of {emb.shape[0]} rows")
    try:
        params = rename.from_hf({k: np.asarray(v, np.float32) for k, v in tensors.items()}, cfg, task)
        from flax import linen as nn

        from bert_jax.model.heads import abstract_params
        rename.check_shapes(params, nn.unbox(abstract_params(cfg, task)))
    except rename.RenameError as e:
        raise ConvertError(f"{folder}: {e}") from None
    return cfg, task, params, d


# ------------------------------------------------------------------ arrays -> HF ----
def save_hf(out: str | pathlib.Path, cfg: ModelConfig, task: str, params,
            tokenizer_dir: str | pathlib.Path | None = None, dtype: str = "float32",
            id2label: dict[int, str] | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """A transformers folder: config.json (architectures, label maps), safetensors (sharded
    above `max_shard_bytes`), tokenizer files."""
    from safetensors.numpy import save_file
    architecture = hf_architecture(cfg, task)
    tensors = rename.to_hf(params, cfg, task)
    if dtype == "bfloat16":
        import ml_dtypes
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    elif dtype != "float32":
        raise ConvertError(f"--hf_dtype={dtype!r}: must be float32 or bfloat16")
    d = rename.hf_config_dict(cfg, task)
    d["architectures"] = [architecture]
    d["torch_dtype"] = dtype
    d["tie_word_embeddings"] = True
    if task in ("sequence_classification", "token_classification"):
        labels = id2label or {i: f"LABEL_{i}" for i in range(cfg.num_labels)}
        d["id2label"] = {str(k): v for k, v in labels.items()}
        d["label2id"] = {v: int(k) for k, v in labels.items()}
        if task == "sequence_classification" and cfg.num_labels == 1:
            d["problem_type"] = "regression"
    with _staging(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(d, indent=1))
        total = sum(v.nbytes for v in tensors.values())
        if total <= max_shard_bytes:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            shards, cur, size = [], {}, 0
            for k in sorted(tensors):
                if cur and size + tensors[k].nbytes > max_shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k] = tensors[k]
                size += tensors[k].nbytes
            shards.append(cur)
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in shard})
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)


# ---------------------------------------------------------------- our folders ----
def save_ours(out: str | pathlib.Path, cfg: ModelConfig, task: str, params,
              tokenizer_dir: str | pathlib.Path | None, source: str = "",
              labels: list[str] | None = None) -> None:
    """Our checkpoint folder: config.json, task.json, tokenizer/, checkpoints/0 (orbax),
    and labels.json (the label names in id order) when the task has named labels."""
    with _staging(out) as tmp:
        checkpoint.write_config(tmp, cfg)
        (tmp / "task.json").write_text(json.dumps({"task": task, "source": source}))
        if labels:
            (tmp / LABELS_FILE).write_text(json.dumps(list(labels)))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        ck = checkpoint.Checkpointer(tmp, keep=1, async_save=False, this_process_only=True)
        ck.save(0, {"params": params}, {}, {"source": source, "task": task,
                                            "packages": checkpoint.package_versions()})
        ck.close()


def load(folder: str | pathlib.Path) -> tuple[ModelConfig, str, Any, pathlib.Path | None]:
    """(config, task, params, tokenizer folder or None) from our folder (pretraining
    workdir or converted) or a transformers folder."""
    folder = storage.path(folder)
    if (folder / "checkpoints").is_dir():  # read by orbax, from a local folder or a store
        cfg, params, _ = checkpoint.load_params(folder)
        task_file = folder / "task.json"
        task = json.loads(task_file.read_text())["task"] if task_file.exists() else "pretraining"
        tok = folder / "tokenizer"
        return cfg, task, params, storage.local_folder(tok) if tok.is_dir() else None
    if storage.is_remote(folder):  # a transformers folder on a store: read from a local copy
        folder = storage.local_folder(folder)
    cfg, task, params, _ = load_hf(folder)
    has_tok = any((folder / f).exists() for f in ("vocab.txt", "vocab.json", "spiece.model", "tokenizer.json"))
    return cfg, task, params, folder if has_tok else None


def read_labels(folder: str | pathlib.Path) -> list[str] | None:
    """The label names in id order: our labels.json, or a transformers config's id2label
    (None when the folder has neither, or only transformers' LABEL_i placeholders)."""
    folder = storage.path(folder)
    if (folder / LABELS_FILE).exists():
        labels = json.loads((folder / LABELS_FILE).read_text())
        return [str(x) for x in labels] or None
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        id2label = json.loads(cfg_path.read_text()).get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
        if labels and labels != [f"LABEL_{i}" for i in range(len(labels))]:
            return labels
    return None


class _staging:
    """Write into a temporary sibling of `out`; move it into place only on success."""

    def __init__(self, out):
        self.out = pathlib.Path(out)

    def __enter__(self) -> pathlib.Path:
        if self.out.exists() and any(self.out.iterdir()):
            raise ConvertError(f"--out folder {self.out} exists and is not empty; refusing to overwrite")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = pathlib.Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}."))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            if self.out.exists():
                self.out.rmdir()
            self.tmp.rename(self.out)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def export(checkpoint_dir: str | pathlib.Path, to_hf: str | pathlib.Path,
           dtype: str = "float32") -> tuple[ModelConfig, str]:
    """Our checkpoint folder -> a transformers folder, label names included."""
    cfg, task, params, tok = load(checkpoint_dir)
    labels = read_labels(checkpoint_dir)
    if labels is not None and len(labels) != cfg.num_labels:
        raise ConvertError(f"{checkpoint_dir}/{LABELS_FILE} names {len(labels)} labels but the "
                           f"model has num_labels={cfg.num_labels}")
    save_hf(to_hf, cfg, task, params, tok, dtype, id2label=dict(enumerate(labels)) if labels else None)
    return cfg, task
