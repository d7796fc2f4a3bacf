"""`predict` job: a fine-tuned checkpoint on unlabeled input.

    ./launch.sh predict --checkpoint=runs/sst2/best --input=FILE --output=FILE

The checkpoint is the `best/` folder of a `finetune` run: it carries the task head, the
label names and the task options (columns, schemes, lengths) of its run. Input by task:
  classification / regression  TSV, CSV or JSONL rows (text, and pair) -> a TSV of id,
                               text(s), prediction and per-class probabilities (regression:
                               the score)
  ner                          one word per line, blank lines between sentences -> CoNLL
                               `word tag` lines in the run's tag scheme
  qa                           SQuAD-format JSON (answers not needed) -> the official
                               {id: answer} JSON
Rows are batched by length; output is in input order. Reading, features, decoding and the
output files are those of the evaluation in `finetune`, so a labeled file gives the same
predictions either way. Nothing is written unless every row was predicted.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax

from bert_jax import paths, storage
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.interop import convert
from bert_jax.model.heads import build_model
from bert_jax.options import PredictOptions
from bert_jax.tasks import finetune_tasks
from bert_jax.tasks.readers import TaskDataError
from bert_jax.training import train
from bert_jax.training.finetuning import TASK_FILE, FinetuneOptions, run_model


class PredictError(BertJaxError, ValueError):
    """The checkpoint or input cannot be used; the message names which and why."""


def task_options(folder: pathlib.Path, o: PredictOptions) -> FinetuneOptions:
    """The fine-tuning options recorded in the checkpoint, with the input overrides."""
    record = folder / TASK_FILE
    if not record.is_file():
        raise PredictError(f"--checkpoint={folder}: no {TASK_FILE}, so no trained task head: predict "
                           "takes the best/ folder of a finetune run")
    d = json.loads(record.read_text())
    fields = {f.name for f in dataclasses.fields(FinetuneOptions)}
    d = {k: tuple(map(tuple, v)) if k == "eval_files" else tuple(v) if k == "labels" else v
         for k, v in d.items() if k in fields}
    over = {k: getattr(o, k) for k in ("text_column", "pair_column", "header", "encoding")
            if getattr(o, k) is not None}
    return FinetuneOptions(**dict(d, workdir="", **over))


def predict(o: PredictOptions) -> dict:
    out_path = paths.check_output("--output", o.output, input=o.input, checkpoint=o.checkpoint)
    folder = storage.path(o.checkpoint)  # a local folder or a URI (gs://...)
    if not folder.is_dir():
        raise PredictError(f"--checkpoint={folder}: no such folder")
    fo = task_options(folder, o)
    task = finetune_tasks.make(fo)
    cfg, model_task, params, tok_dir = convert.load(folder)
    if model_task != task.model_task:
        raise PredictError(f"--checkpoint={folder}: holds a {model_task} model, but its run was "
                           f"--task={fo.task} ({task.model_task})")
    labels = convert.read_labels(folder) or []
    tok = Tokenizer.load(tok_dir)
    if out_path.is_dir():
        raise PredictError(f"--output={out_path} is a folder; give a file name")
    if not pathlib.Path(o.input).is_file():
        raise PredictError(f"--input={o.input}: no such file")
    try:
        examples = task.read(o.input, labeled=False)
    except TaskDataError as e:
        raise PredictError(f"--input: {e}") from None
    feats = task.features(tok, examples, labels, labeled=False)
    model = build_model(cfg, model_task)
    forward = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))
    params = jax.device_put(params)
    outputs = run_model(lambda i, t, m: forward(params, i, t, m), feats, o.batch_size, fo.max_seq_length)
    preds = task.decode(outputs, feats, examples, labels)
    paths.write_atomically(out_path, lambda tmp: task.write_predictions(tmp, o.input, examples, preds, labels))
    return {"task": fo.task, "rows": len(examples), "features": len(feats), "output": str(out_path)}


def main(o: PredictOptions):
    train.use_compilation_cache(o.compilation_cache, None)
    summary = predict(o)
    print(f"predict: {summary['rows']} {summary['task']} inputs -> {summary['output']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    from bert_jax import flags as _flags
    _flags.run_job(main, PredictOptions)
