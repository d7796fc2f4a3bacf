"""`encode` job: features of a checkpoint for the texts of a file.

    ./launch.sh encode --checkpoint=DIR --input=texts.jsonl --output=features.npz

Input: `.txt` (one text, or `text<TAB>text` pair, per line) or `.jsonl` (`text`, optional
`text_pair`; texts may hold tabs and newlines; singles and pairs may mix). Texts are batched sorted by length to
limit padding; outputs come back in input order, padded to the longest input:
input_ids, attention_mask, token_type_ids (N x L), last_hidden_state (N x L x H, float32),
pooler_output (N x H; absent for checkpoints without a pooler), mean_embedding (N x H,
the attention-masked mean of last_hidden_state).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bert_jax import paths
from bert_jax.data import textfile
from bert_jax.data.tokenizer import Tokenizer, pad_batch
from bert_jax.errors import BertJaxError


class EncodeError(BertJaxError, ValueError):
    """Bad input file; the message names the file and line."""


def read_inputs(path: str | pathlib.Path, max_chars: int | None = None) -> tuple[list[str], list[str] | None]:
    """(texts, pairs or None) of a .txt (text or text<TAB>pair per line) or .jsonl input,
    each text cut to `max_chars` characters (at a space where there is one). A .txt file is
    streamed, so a huge line costs `max_chars`, not its length; a .jsonl line is parsed
    whole."""
    path = pathlib.Path(path)
    if not path.exists():
        raise EncodeError(f"--input={path}: no such file")
    rows = _jsonl_rows(path) if path.suffix == ".jsonl" else _txt_rows(path, max_chars)
    texts, pairs, cut = [], [], []
    for i, text, pair in rows:
        for v in (text, pair):
            if max_chars and v is not None and len(v) > max_chars:
                cut.append(i)
        texts.append(textfile.cut(text, max_chars))
        pairs.append(None if pair is None else textfile.cut(pair, max_chars))
    if not texts:
        raise EncodeError(f"--input={path}: no texts")
    if cut:
        logging.info("%s: %d input(s) over %d characters were cut there (first: line %d)", path, len(cut),
                     max_chars, cut[0])
    return texts, (None if all(p is None for p in pairs) else pairs)


def _txt_rows(path: pathlib.Path, max_chars: int | None):
    """(line number, text, pair or None) per line, streamed (textfile.rows): lines break
    where str.splitlines breaks them; the first TAB starts the pair."""
    for i, fields in textfile.rows(path, max_chars, max_fields=2, errors="replace"):
        yield i, fields[0], fields[1] if len(fields) > 1 else None


def _jsonl_rows(path: pathlib.Path):
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                text, pair = r["text"], r.get("text_pair")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EncodeError(f"{path}:{i}: expected a JSON object with a 'text' field ({e})") from None
            for name, value in (("text", text), ("text_pair", pair)):
                if not isinstance(value, str) and not (name == "text_pair" and value is None):
                    raise EncodeError(f"{path}:{i}: '{name}' must be a string, not {json.dumps(value)}")
            yield i, text, pair


def encode(folder: str | pathlib.Path, texts: list[str], pairs: list[str] | None = None,
           max_length: int = 512, batch_size: int = 32) -> dict[str, np.ndarray]:
    from bert_jax.interop import convert
    from bert_jax.model.encoder import Backbone
    cfg, task, params, tok_dir = convert.load(folder)
    if tok_dir is None:
        raise EncodeError(f"{folder} carries no tokenizer files")
    tok = Tokenizer.load(tok_dir)
    cfg.check_sequence_length(max_length, "--max_length")
    encs = _encode_mixed(tok, texts, pairs, max_length)
    truncated = [i for i, e in enumerate(encs) if e.truncated]
    if truncated:
        logging.warning("%d of %d input(s) are longer than --max_length=%d tokens and were truncated "
                        "(first: input %d)", len(truncated), len(encs), max_length, truncated[0] + 1)
    has_pooler = "pooler" in params["backbone"]
    model = Backbone(cfg, add_pooler=has_pooler)
    apply = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))
    order = np.argsort([len(e) for e in encs], kind="stable")
    L = max(len(e) for e in encs)
    N, H = len(encs), cfg.hidden_size
    out = {"input_ids": np.full((N, L), tok.pad_id, np.int32), "attention_mask": np.zeros((N, L), np.int32),
           "token_type_ids": np.zeros((N, L), np.int32),
           "last_hidden_state": np.zeros((N, L, H), np.float32), "mean_embedding": np.zeros((N, H), np.float32)}
    if has_pooler:
        out["pooler_output"] = np.zeros((N, H), np.float32)
    for s in range(0, N, batch_size):
        idx = order[s:s + batch_size]
        length = -(-max(len(encs[i]) for i in idx) // 8) * 8  # multiples of 8: few compiles
        b = pad_batch([encs[i] for i in idx], tok.pad_id, length)
        r = apply(params["backbone"], jnp.asarray(b["input_ids"]), jnp.asarray(b["token_type_ids"]),
                  jnp.asarray(b["attention_mask"]))
        h = np.asarray(r["sequence_output"], np.float32)
        m = b["attention_mask"].astype(np.float32)
        for j, i in enumerate(idx):
            n = len(encs[i])
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                out[k][i, :n] = b[k][j, :n]
            out["last_hidden_state"][i, :n] = h[j, :n]
            out["mean_embedding"][i] = (h[j] * m[j, :, None]).sum(0) / m[j].sum()
            if has_pooler:
                out["pooler_output"][i] = np.asarray(r["pooled_output"][j], np.float32)
    return out


def _encode_mixed(tok: Tokenizer, texts, pairs, max_length):
    """Encodings in input order; single texts and pairs may be mixed."""
    if pairs is None:
        return tok.encode_batch(texts, None, max_length=max_length)
    single = [i for i, p in enumerate(pairs) if p is None]
    paired = [i for i, p in enumerate(pairs) if p is not None]
    out = [None] * len(texts)
    if single:
        for i, e in zip(single, tok.encode_batch([texts[i] for i in single], max_length=max_length)):
            out[i] = e
    if paired:
        for i, e in zip(paired, tok.encode_batch([texts[i] for i in paired],
                                                 [pairs[i] for i in paired], max_length=max_length)):
            out[i] = e
    return out


def main(o):
    from bert_jax.training import train
    out = paths.check_output("--output", o.output, input=o.input, checkpoint=o.checkpoint)
    train.use_compilation_cache(o.compilation_cache, None)
    texts, pairs = read_inputs(o.input, textfile.CHARS_PER_TOKEN * o.max_length)
    feats = encode(o.checkpoint, texts, pairs, o.max_length, o.batch_size)

    def write(tmp):
        with open(tmp, "wb") as f:  # exactly this path (np.savez would add .npz to a name)
            np.savez(f, **feats)
    paths.write_atomically(out, write)
    print(f"encode: {len(texts)} texts -> {out} ({', '.join(sorted(feats))}; "
          f"{feats['input_ids'].shape[1]} tokens per row, the longest input)")


if __name__ == "__main__":
    from bert_jax import flags as _flags
    from bert_jax.options import EncodeOptions
    _flags.run_job(main, EncodeOptions)
