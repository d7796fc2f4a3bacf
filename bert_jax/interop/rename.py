"""The rename table between our param paths and Hugging Face transformers tensor names,
for BERT, RoBERTa and ALBERT and every head, with the layout change each tensor needs.

`hf_entries(cfg, task)` is the table; `to_hf` and `from_hf` apply it. Arrays are NumPy
on both sides (no framework dependency here); `convert.py` adds file handling.

Layouts. HF Linear weights are [out, in]; ours are [in..., out...] with heads kept as
their own axis: query/key/value kernels are HxNxK (HF: N*K x H), the attention output
kernel is NxKxH (HF: H x N*K). Stacked layer banks carry a leading copies axis; copy c of
an ALBERT bank is group c // I, inner layer c % I.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from bert_jax.errors import BertJaxError
from bert_jax.model.config import ModelConfig, layer_copy_maps


class RenameError(BertJaxError, ValueError):
    """Tensors do not fit the config/task; the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Entry:
    path: tuple[str, ...]   # our param path
    copy: int | None        # index on the leading layers axis, None if unstacked
    hf: str                 # Hugging Face tensor name
    kind: str               # layout: same | linear | to_heads | heads_bias | from_heads


# Tensors HF keeps that are buffers or tied copies, not parameters of their own.
HF_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
HF_TIED = {
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    "albert": ("predictions.decoder.weight", "predictions.decoder.bias"),
}


def _linear(path, hf):
    return [Entry(path + ("kernel",), None, hf + ".weight", "linear"),
            Entry(path + ("bias",), None, hf + ".bias", "same")]


def _norm(path, hf, copy=None):
    return [Entry(path + ("scale",), copy, hf + ".weight", "same"),
            Entry(path + ("bias",), copy, hf + ".bias", "same")]


def _layer_entries(cfg: ModelConfig, prefix: str) -> list[Entry]:
    attn_map, ffn_map = layer_copy_maps(cfg)
    n_attn = max(attn_map) + 1
    base = ("backbone", "encoder", "layer")
    out = []
    if cfg.family == "albert":
        if attn_map != ffn_map:
            raise RenameError(f"share_scope={cfg.share_scope!r}: Hugging Face ALBERT shares whole "
                              "layers only; a partially shared model has no HF layout")
        for c in range(n_attn):
            hf = f"{prefix}encoder.albert_layer_groups.{c // cfg.inner_group_num}.albert_layers.{c % cfg.inner_group_num}."
            copy = c if n_attn > 1 else None
            a, f = base + ("attention",), base + ("ffn",)
            for name in ("query", "key", "value"):
                out += [Entry(a + (name, "kernel"), copy, hf + f"attention.{name}.weight", "to_heads"),
                        Entry(a + (name, "bias"), copy, hf + f"attention.{name}.bias", "heads_bias")]
            out += [Entry(a + ("output", "kernel"), copy, hf + "attention.dense.weight", "from_heads"),
                    Entry(a + ("output", "bias"), copy, hf + "attention.dense.bias", "same")]
            out += _norm(a + ("norm",), hf + "attention.LayerNorm", copy)
            out += [Entry(f + ("intermediate", "kernel"), copy, hf + "ffn.weight", "linear"),
                    Entry(f + ("intermediate", "bias"), copy, hf + "ffn.bias", "same"),
                    Entry(f + ("output", "kernel"), copy, hf + "ffn_output.weight", "linear"),
                    Entry(f + ("output", "bias"), copy, hf + "ffn_output.bias", "same")]
            out += _norm(f + ("norm",), hf + "full_layer_layer_norm", copy)
        return out
    if not (attn_map == ffn_map == tuple(range(cfg.depth))):
        raise RenameError(f"num_hidden_groups={cfg.num_hidden_groups}, inner_group_num="
                          f"{cfg.inner_group_num}, share_scope={cfg.share_scope!r}: Hugging Face "
                          f"{cfg.family} has no shared layers; use family='albert' to export sharing")
    for d in range(cfg.depth):
        hf, copy = f"{prefix}encoder.layer.{d}.", d if cfg.depth > 1 else None
        a, f = base + ("attention",), base + ("ffn",)
        for name in ("query", "key", "value"):
            out += [Entry(a + (name, "kernel"), copy, hf + f"attention.self.{name}.weight", "to_heads"),
                    Entry(a + (name, "bias"), copy, hf + f"attention.self.{name}.bias", "heads_bias")]
        out += [Entry(a + ("output", "kernel"), copy, hf + "attention.output.dense.weight", "from_heads"),
                Entry(a + ("output", "bias"), copy, hf + "attention.output.dense.bias", "same")]
        out += _norm(a + ("norm",), hf + "attention.output.LayerNorm", copy)
        out += [Entry(f + ("intermediate", "kernel"), copy, hf + "intermediate.dense.weight", "linear"),
                Entry(f + ("intermediate", "bias"), copy, hf + "intermediate.dense.bias", "same"),
                Entry(f + ("output", "kernel"), copy, hf + "output.dense.weight", "linear"),
                Entry(f + ("output", "bias"), copy, hf + "output.dense.bias", "same")]
        out += _norm(f + ("norm",), hf + "output.LayerNorm", copy)
    return out


def hf_config_dict(cfg: ModelConfig, task: str = "base") -> dict:
    """A transformers `config.json` dict equivalent to `cfg` (raises if HF cannot
    represent it)."""
    hf_entries(cfg, task)  # validates that the layout is representable
    d = dict(model_type=cfg.family, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
             intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
             hidden_dropout_prob=cfg.hidden_dropout_prob,
             attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
             max_position_embeddings=cfg.max_position_embeddings,
             type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps,
             pad_token_id=cfg.pad_token_id, initializer_range=0.02,
             # HF sizes AlbertSOPHead and qa_outputs by num_labels: those need 2.
             num_labels=2 if task in ("pretraining", "question_answering") else cfg.num_labels)
    if cfg.family == "albert":
        d.update(embedding_size=cfg.embed_dim, num_hidden_groups=cfg.num_hidden_groups,
                 inner_group_num=cfg.inner_group_num, classifier_dropout_prob=cfg.head_dropout)
        if cfg.share_scope == "none":  # every layer its own group
            d.update(num_hidden_groups=cfg.num_hidden_layers)
    else:
        d.update(classifier_dropout=cfg.classifier_dropout)
    if cfg.family == "roberta":
        d.update(bos_token_id=0, eos_token_id=2)
    return d


def config_from_hf(d: Mapping, **overrides) -> ModelConfig:
    """Our ModelConfig from a transformers `config.json` dict."""
    family = d.get("model_type")
    if family not in ("bert", "roberta", "albert"):
        raise RenameError(f"config.json model_type={family!r}: unsupported architecture "
                          "(supported: bert, roberta, albert)")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
            "layer_norm_eps", "pad_token_id")
    kw = {k: d[k] for k in keys if d.get(k) is not None}
    kw["family"] = family
    labels = d.get("id2label")
    if labels:
        kw["num_labels"] = len(labels)
    if family == "albert":
        kw.update(embedding_size=d.get("embedding_size", 128),
                  num_hidden_groups=d.get("num_hidden_groups", 1),
                  inner_group_num=d.get("inner_group_num", 1))
        if d.get("classifier_dropout_prob") is not None:
            kw["classifier_dropout"] = d["classifier_dropout_prob"]
    elif d.get("classifier_dropout") is not None:
        kw["classifier_dropout"] = d["classifier_dropout"]
    kw.update(overrides)
    return ModelConfig(**kw)


def has_pooler(cfg: ModelConfig, task: str) -> bool:
    if task == "base":
        return True
    if task == "pretraining":
        return cfg.pretraining_objective.sentence_task is not None
    return task == "sequence_classification" and cfg.family != "roberta"


def _sentence_head_entries(cfg: ModelConfig) -> list[Entry]:
    """The objective's sentence head under the name its Hugging Face class gives it.
    Where no class holds that head on this family (transformers has BERT's NSP in
    BertForPreTraining and ALBERT's SOP in AlbertForPreTraining only), refuse rather
    than relabel it."""
    obj = cfg.pretraining_objective
    if obj.sentence_task is None:
        return []
    if cfg.family not in obj.hf:
        kind = obj.sentence_task.upper()
        held = ", ".join(f"{kind} on {f}" for f in obj.hf)
        raise RenameError(f"objective={cfg.objective!r} on family {cfg.family!r}: no Hugging Face "
                          f"class holds a {kind} head on {cfg.family} (transformers has "
                          f"{held}, and masked LM alone on every family)")
    return _linear(("sentence",), obj.hf[cfg.family][1])


def hf_entries(cfg: ModelConfig, task: str) -> list[Entry]:
    """The full table for `task` (see heads.TASKS) in HF's `<Family>For<Task>` naming
    (`base` = `<Family>Model`, whose names carry the same `bert.`/`roberta.`/`albert.`
    prefix here; `from_hf` accepts them without it)."""
    fam = cfg.family
    p = f"{fam}."
    emb = ("backbone", "embeddings")
    out = [Entry(emb + ("word_embeddings",), None, p + "embeddings.word_embeddings.weight", "same"),
           Entry(emb + ("position_embeddings",), None, p + "embeddings.position_embeddings.weight", "same"),
           Entry(emb + ("token_type_embeddings",), None, p + "embeddings.token_type_embeddings.weight", "same")]
    out += _norm(emb + ("norm",), p + "embeddings.LayerNorm")
    if cfg.embed_dim != cfg.hidden_size:
        if fam != "albert":
            raise RenameError(f"embedding_size={cfg.embedding_size}: Hugging Face {fam} has no "
                              "factorized embeddings; use family='albert' to export them")
        out += _linear(emb + ("projection",), p + "encoder.embedding_hidden_mapping_in")
    out += _layer_entries(cfg, p)
    if has_pooler(cfg, task):
        out += _linear(("backbone", "pooler"), p + ("pooler" if fam == "albert" else "pooler.dense"))

    if task == "pretraining":
        mlm = ("mlm",)
        if fam == "bert":
            out += _linear(mlm + ("transform",), "cls.predictions.transform.dense")
            out += _norm(mlm + ("norm",), "cls.predictions.transform.LayerNorm")
            out += [Entry(mlm + ("bias",), None, "cls.predictions.bias", "same")]
        elif fam == "roberta":
            out += _linear(mlm + ("transform",), "lm_head.dense")
            out += _norm(mlm + ("norm",), "lm_head.layer_norm")
            out += [Entry(mlm + ("bias",), None, "lm_head.bias", "same")]
        else:
            out += _linear(mlm + ("transform",), "predictions.dense")
            out += _norm(mlm + ("norm",), "predictions.LayerNorm")
            out += [Entry(mlm + ("bias",), None, "predictions.bias", "same")]
        out += _sentence_head_entries(cfg)
    elif task == "sequence_classification":
        if fam == "roberta":
            out += _linear(("classifier_dense",), "classifier.dense")
            out += _linear(("classifier",), "classifier.out_proj")
        else:
            out += _linear(("classifier",), "classifier")
    elif task == "token_classification":
        out += _linear(("classifier",), "classifier")
    elif task == "question_answering":
        out += _linear(("qa_outputs",), "qa_outputs")
    elif task != "base":
        raise RenameError(f"task={task!r}: unknown")
    return out


# ------------------------------- layout transforms ----------------------------------
def _ours_to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "same":
        return x
    if kind == "linear":                       # [in, out] -> [out, in]
        return x.T
    if kind == "to_heads":                     # [H, N, K] -> [N*K, H]
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_bias":                   # [N, K] -> [N*K]
        return x.reshape(-1)
    if kind == "from_heads":                   # [N, K, H] -> [H, N*K]
        return x.reshape(-1, x.shape[-1]).T
    raise ValueError(kind)


def _hf_to_ours(x: np.ndarray, kind: str, cfg: ModelConfig) -> np.ndarray:
    N, K = cfg.num_attention_heads, cfg.head_dim
    if kind == "same":
        return x
    if kind == "linear":
        return x.T
    if kind == "to_heads":
        return x.T.reshape(x.shape[1], N, K)
    if kind == "heads_bias":
        return x.reshape(N, K)
    if kind == "from_heads":
        return x.T.reshape(N, K, x.shape[0])
    raise ValueError(kind)


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def to_hf(params, cfg: ModelConfig, task: str) -> dict[str, np.ndarray]:
    """Our (unboxed) params -> {HF name: array}. Tied decoder weights are left out, as
    `save_pretrained` leaves them out."""
    out = {}
    prefix = f"{cfg.family}."
    for e in hf_entries(cfg, task):
        x = np.asarray(_get(params, e.path))
        if e.copy is not None:
            x = x[e.copy]
        # A bare <Family>Model names its tensors without the prefix, as HF saves it.
        name = e.hf.removeprefix(prefix) if task == "base" else e.hf
        out[name] = np.ascontiguousarray(_ours_to_hf(x, e.kind))
    return out


def from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, task: str, *,
            strict: bool = True) -> dict:
    """{HF name: array} -> our params (nested dict of NumPy arrays).

    Accepts base-model files whose names lack the `bert.`/`roberta.`/`albert.` prefix.
    Missing tensors and (with `strict`) tensors nobody reads are errors naming them;
    buffers and tied decoder copies are ignored."""
    prefix = f"{cfg.family}."
    if not any(k.startswith(prefix) for k in tensors):
        tensors = {prefix + k: v for k, v in tensors.items()}
    entries = hf_entries(cfg, task)
    missing = [e.hf for e in entries if e.hf not in tensors]
    if missing:
        raise RenameError(f"missing tensors for {cfg.family}/{task}: {missing[:8]}"
                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    used = {e.hf for e in entries}
    ignored = set(HF_TIED[cfg.family])
    unexpected = [k for k in tensors if k not in used and k not in ignored
                  and not k.endswith(HF_IGNORED_SUFFIXES)]
    if strict and unexpected:
        raise RenameError(f"unexpected tensors for {cfg.family}/{task}: {unexpected[:8]}"
                          + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    params: dict = {}
    for e in entries:
        x = _hf_to_ours(np.asarray(tensors[e.hf]), e.kind, cfg)
        if e.copy is None:
            _set(params, e.path, x)
        else:
            stacks.setdefault(e.path, {})[e.copy] = x
    for path, copies in stacks.items():
        _set(params, path, np.stack([copies[i] for i in range(len(copies))]))
    return params


def check_shapes(params, expected) -> None:
    """Raise naming the first param whose shape differs from `expected` (a tree of
    arrays or ShapeDtypeStructs with the same structure), or that is missing/extra."""
    def walk(p, e, path):
        if isinstance(e, Mapping):
            if not isinstance(p, Mapping):
                raise RenameError(f"param {'/'.join(path)}: expected a subtree")
            for k in set(p) | set(e):
                if k not in p:
                    raise RenameError(f"param {'/'.join(path + (k,))}: missing")
                if k not in e:
                    raise RenameError(f"param {'/'.join(path + (k,))}: unexpected")
                walk(p[k], e[k], path + (k,))
        elif tuple(np.shape(p)) != tuple(e.shape):
            raise RenameError(f"param {'/'.join(path)}: shape {tuple(np.shape(p))}, "
                              f"expected {tuple(e.shape)}")
    walk(params, expected, ())
