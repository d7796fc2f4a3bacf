"""`heldout` job: held-out evaluation of any checkpoint with an MLM head on any text.

    ./launch.sh heldout --checkpoint=runs/sweep/RUN/best --text=bert_jax/corpus/heldout/*.txt

Prints (and with --out writes) one JSON object:
  mlm_loss, mlm_accuracy        on FULL-SENTENCES rows of the text, masked with fixed
                                masks: position k of the stream is masked by a key of
                                (--seed, k), so every checkpoint with the same tokenizer is
                                scored on the same rows and the same masked tokens;
  nsp_loss, nsp_accuracy        the model's sentence head on BERT's NSP pairs built from
                                the text (label 0: the real next segment, 1: a random one);
  sop_loss, sop_accuracy        the same head on ALBERT's SOP pairs (0: in order, 1: swapped).
The rows are those of pretraining's held-out evaluation (data/source.py): text that is one
document (one file) stays one document, except for NSP pairs, whose random next segments
come from other documents: there its paragraphs are the documents.
A model trained with NSP is scored on SOP pairs and the other way round, the same head and
label order as ALBERT's Table 5 does; a model without a sentence head (--objective=mlm)
reports the MLM figures only. Works on our folders and on Hugging Face folders alike.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import jax
import numpy as np

from bert_jax import flags, paths
from bert_jax.errors import BertJaxError
from bert_jax.options import HeldoutOptions

# instance kind -> the objective whose loss scores it (the sentence head is the model's own)
KINDS = {"mlm": ("none", "mlm"), "nsp": ("nsp", "mlm_nsp"), "sop": ("sop", "mlm_sop")}


class HeldoutError(BertJaxError, ValueError):
    """The checkpoint or text cannot be evaluated; the message names which."""


def evaluate(o: HeldoutOptions) -> dict:
    if o.cache_dir is None:  # the prepared text lives as long as the evaluation, then goes
        with tempfile.TemporaryDirectory(prefix="heldout_cache_") as d:
            return evaluate(dataclasses.replace(o, cache_dir=d))
    from bert_jax import storage
    from bert_jax.data import corpus, masking, source
    from bert_jax.data.tokenizer import Tokenizer
    from bert_jax.interop import convert
    from bert_jax.model import objectives
    from bert_jax.model.heads import PreTrainingModel
    if not storage.path(o.checkpoint).is_dir():  # a local folder or a URI (gs://...)
        raise HeldoutError(f"--checkpoint={o.checkpoint}: no such folder")
    cfg, task, params, tok_dir = convert.load(o.checkpoint)
    if task != "pretraining":
        raise HeldoutError(f"--checkpoint={o.checkpoint} is a {task} model: held-out evaluation needs the MLM head")
    if tok_dir is None:
        raise HeldoutError(f"--checkpoint={o.checkpoint} carries no tokenizer")
    cfg.check_sequence_length(o.max_seq_length)
    tok = Tokenizer.load(tok_dir)
    files = corpus.expand(o.text, "--text")
    cache_dir = storage.require_local(o.cache_dir, "--cache_dir", "the prepared text is memory-mapped")
    model = PreTrainingModel(cfg)
    apply = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["input_ids"], b["token_type_ids"], b["attention_mask"], b["masked_positions"],
        sentence_positions_BxK=b["sentence_positions"]))
    mcfg = masking.MaskingConfig(o.masked_lm_prob, o.max_predictions_per_seq, False, 1)
    has_head = cfg.pretraining_objective.sentence_task is not None
    out: dict = {"checkpoint": str(o.checkpoint), "rows": o.batches * o.batch_size}
    for name, (kind, objective) in KINDS.items():
        if name != "mlm" and not has_head:
            continue
        c = source.SourceConfig(kind, o.max_seq_length, o.batch_size, o.seed, mcfg, cfg.position_offset,
                                cfg.type_vocab_size, o.document_boundary, o.sentence_splitter)
        try:  # the rows pretraining's held-out evaluation reads from the same text, length and seed
            src = source.make(files, tok, tok_dir, cache_dir, c, flag="--text", workers=1)
        except ValueError as e:  # the text holds less than one row
            raise HeldoutError(f"--text={o.text}: too little text to build {name.upper()} rows ({e})") from None
        if len(src.instances) == 0:
            raise HeldoutError(f"--text={o.text}: too little text to build {name.upper()} rows")
        obj, sums = objectives.get(objective), {}
        for b in range(o.batches):
            rows = [src.example(b * o.batch_size + j) for j in range(o.batch_size)]
            batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            _, m = obj.loss(apply(params, batch), batch)
            for k, v in jax.device_get(m).items():
                sums[k] = sums.get(k, 0.0) + float(v)
        fig = obj.figures(sums)
        if name == "mlm":
            out.update(mlm_loss=fig["mlm_loss"], mlm_accuracy=fig["mlm_accuracy"])
        else:
            out.update({f"{name}_loss": fig["sentence_loss"], f"{name}_accuracy": fig["sentence_accuracy"]})
    return out


def main(o: HeldoutOptions):
    if o.out:  # checked before the work
        from bert_jax.data import corpus
        paths.check_output("--out", o.out, text=[str(f) for f in corpus.expand(o.text, "--text")],
                           checkpoint=o.checkpoint)
    from bert_jax.training import train
    train.use_compilation_cache(o.compilation_cache, None)
    res = evaluate(o)
    if o.out:
        paths.write_atomically(o.out, lambda tmp: tmp.write_text(json.dumps(res, indent=1)))
    print(json.dumps(res))


if __name__ == "__main__":
    flags.run_job(main, HeldoutOptions)
