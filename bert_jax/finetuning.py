"""Fine-tuning and evaluation, as the BERT paper does it: the pretrained encoder plus a
fresh task head, AdamW with linear warmup then linear decay, dropout, evaluation every N
steps and at the end, best-checkpoint selection on one metric.

Tasks:
  classification  single texts or pairs -> label   (SST-2, MRPC, RTE, any TSV/CSV/JSONL)
  regression      pairs -> score                    (STS-B)
  ner             CoNLL words -> tags; label on each word's first sub-token; decoding
                  by Viterbi under the output scheme's valid transitions
  qa              SQuAD v1.1/v2.0 extractive QA over sliding windows

Writes <workdir>/metrics.jsonl, <workdir>/best/ (our checkpoint folder of the best
params, with tokenizer), and per eval file eval/NAME.json + eval/NAME.predictions.*.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from bert_jax import checkpoint, convert, metrics, optim, rename, tagging
from bert_jax.data import squad, tasks
from bert_jax.heads import build_model, init_params
from bert_jax.tokenizer import Tokenizer, pad_batch

TASKS = ("classification", "regression", "ner", "qa")
MODEL_TASK = {"classification": "sequence_classification", "regression": "sequence_classification",
              "ner": "token_classification", "qa": "question_answering"}
DEFAULT_METRIC = {"classification": "accuracy", "regression": "spearman", "ner": "f1", "qa": "f1"}
METRICS = {"classification": ("accuracy", "f1", "mcc"), "regression": ("pearson", "spearman"),
           "ner": ("precision", "recall", "f1"), "qa": ("exact_match", "f1")}


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    task: str
    init_checkpoint: str
    train_file: str
    workdir: str
    eval_files: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    text_column: str = "sentence"
    pair_column: str | None = None
    label_column: str = "label"
    labels: tuple[str, ...] = ()             # default: sorted labels of the train file
    tag_scheme: str = "IOB2"                 # of the CoNLL files
    output_scheme: str = "BIOES"             # what the tagger learns and decodes
    max_seq_length: int = 128
    doc_stride: int = 128
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float | None = None      # SQuAD v2.0
    batch_size: int = 32
    learning_rate: float = 2e-5
    epochs: float = 3.0
    warmup_proportion: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 0                      # 0: at the end only
    best_metric: str | None = None
    max_train_examples: int | None = None    # subsample (seeded) for quick runs
    dropout: float | None = None             # override the checkpoint's dropout
    dtype: str = "float32"


class FinetuneError(ValueError):
    """Bad options or a checkpoint that does not fit; the message names what."""


# ------------------------------------------------------------------ features ----
def text_features(tok: Tokenizer, ex: list[tasks.TextExample], max_len: int, labels) -> dict:
    encs = tok.encode_batch([e.text for e in ex], [e.pair for e in ex] if ex[0].pair is not None else None,
                            max_length=max_len)
    f = pad_batch(encs, tok.pad_id, max_len)
    f["labels"] = np.asarray(labels, np.float32 if isinstance(labels[0], float) else np.int32)
    return f


def ner_features(tok: Tokenizer, sents: list[tasks.TaggedSentence], max_len: int, label_list, scheme) -> dict:
    index = {l: i for i, l in enumerate(label_list)}
    encs, labels, first = [], [], []
    for s in sents:
        e = tok.encode_words(s.words, max_length=max_len)
        tags = tagging.convert(s.tags, "IOB2", scheme)
        lab = np.full(max_len, -1, np.int32)
        firsts = np.full(len(s.words), -1, np.int32)
        prev = None
        for j, w in enumerate(e.word_ids):
            if w is not None and w != prev:
                if tags[w] not in index:
                    raise tasks.TaskDataError(f"{s.where}: unknown tag {tags[w]!r} (labels: {label_list})")
                lab[j], firsts[w] = index[tags[w]], j
            prev = w
        encs.append(e)
        labels.append(lab)
        first.append(firsts)
    f = pad_batch(encs, tok.pad_id, max_len)
    f["labels"] = np.stack(labels)
    f["_first_token"] = first  # per sentence: token index of each word (-1 if truncated)
    return f


# ---------------------------------------------------------------------- loss ----
def loss_fn(kind: str, model, params, batch, rng, deterministic=False):
    kw = dict(deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    out = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                      batch["attention_mask"], **kw)
    if kind == "classification":
        return optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"]).mean()
    if kind == "regression":
        return jnp.mean((out[:, 0] - batch["labels"]) ** 2)
    if kind == "ner":
        w = (batch["labels"] >= 0).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(out, jnp.maximum(batch["labels"], 0))
        return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)
    start, end = out
    ce = optax.softmax_cross_entropy_with_integer_labels
    return (ce(start, batch["start_positions"]).mean() + ce(end, batch["end_positions"]).mean()) / 2


# ------------------------------------------------------------------ the run ----
class Finetuner:
    def __init__(self, o: FinetuneOptions):
        if o.task not in TASKS:
            raise FinetuneError(f"--task={o.task!r}: must be one of {TASKS}")
        if o.best_metric is not None and o.best_metric not in METRICS[o.task]:
            raise FinetuneError(f"--best_metric={o.best_metric!r}: {o.task} reports {METRICS[o.task]}")
        self.o = o
        if not pathlib.Path(o.init_checkpoint).is_dir():
            raise FinetuneError(f"--init_checkpoint={o.init_checkpoint}: no such folder")
        for name, path in [("--train_file", o.train_file)] + [(f"--eval_files={n}", p) for n, p in o.eval_files]:
            if not pathlib.Path(path).is_file():
                raise FinetuneError(f"{name}={path}: no such file")
        src_cfg, _, src_params, tok_dir = convert.load(o.init_checkpoint)
        if tok_dir is None:
            raise FinetuneError(f"--init_checkpoint={o.init_checkpoint} carries no tokenizer")
        self.tok_dir, self.tok = tok_dir, Tokenizer.load(tok_dir)
        self._read_train()
        self._check_train()
        changes = dict(num_labels=self.num_labels, dtype=o.dtype)
        if o.dropout is not None:
            changes.update(hidden_dropout_prob=o.dropout, attention_probs_dropout_prob=o.dropout)
        self.cfg = src_cfg.replace(**changes)
        self.cfg.check_sequence_length(o.max_seq_length)
        self.mtask = MODEL_TASK[o.task]
        self.model = build_model(self.cfg, self.mtask)
        fresh = nn.unbox(init_params(self.cfg, self.mtask, jax.random.key(o.seed)))
        self.params = load_backbone(fresh, src_params, o.init_checkpoint)

    def _read_train(self):
        o = self.o
        rng = np.random.default_rng(o.seed)
        if o.task in ("classification", "regression"):
            ex = tasks.read_text_examples(o.train_file, o.text_column, o.label_column, o.pair_column,
                                          regression=o.task == "regression")
            ex = subsample(ex, o.max_train_examples, rng)
            if o.task == "classification":
                self.labels = list(o.labels) or sorted({e.label for e in ex})
                self.num_labels = len(self.labels)
                self.train = text_features(self.tok, ex, o.max_seq_length, tasks.label_ids(ex, self.labels))
            else:
                self.labels, self.num_labels = [], 1
                self.train = text_features(self.tok, ex, o.max_seq_length, [float(e.label) for e in ex])
        elif o.task == "ner":
            sents = subsample(tasks.read_conll(o.train_file, o.tag_scheme), o.max_train_examples, rng)
            for s in sents:
                s.tags = tagging.convert(s.tags, o.tag_scheme, "IOB2")
            types = sorted({t[2:] for s in sents for t in s.tags if t != "O"})
            self.labels = list(o.labels) or tagging.labels_for(types, o.output_scheme)
            self.num_labels = len(self.labels)
            self.train = ner_features(self.tok, sents, o.max_seq_length, self.labels, o.output_scheme)
            self.train.pop("_first_token")
        else:
            ex = subsample(tasks.read_squad(o.train_file, training=True), o.max_train_examples, rng)
            feats = squad.make_features(self.tok, ex, o.max_seq_length, o.doc_stride, o.max_query_length)
            self.labels, self.num_labels = [], 2
            self.train = dict(input_ids=feats.input_ids, token_type_ids=feats.token_type_ids,
                              attention_mask=feats.attention_mask, start_positions=feats.start_positions,
                              end_positions=feats.end_positions)

    def _check_train(self):
        if len(self.train["input_ids"]) == 0:
            raise FinetuneError(f"--train_file={self.o.train_file}: no usable training example "
                                "(every one was skipped; the log says why)")

    def run(self) -> dict:
        """Fine-tune and evaluate in o.workdir, holding its lock. A workdir of a finished
        run with the same options returns that run's results; one of another run is
        refused (check_workdir)."""
        wd = pathlib.Path(self.o.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        with checkpoint.WorkdirLock(wd, "finetune"):
            finished = check_workdir(wd, self.o)
            if finished is not None:
                logging.info("%s already holds this run's results", wd)
                return finished
            return self._run()

    def _run(self) -> dict:
        o = self.o
        wd, n, warmup, total = self._plan()
        ocfg = optim.OptimConfig("adamw", o.learning_rate, warmup, total,
                                 weight_decay=o.weight_decay, max_grad_norm=1.0)
        tx = optim.make(ocfg)
        opt_state = tx.init(self.params)
        kind, model = o.task, self.model

        @jax.jit
        def step(params, opt_state, batch, rng):
            loss, g = jax.value_and_grad(lambda p: loss_fn(kind, model, p, batch, rng))(params)
            upd, opt_state = tx.update(g, opt_state, params)
            return optax.apply_updates(params, upd), opt_state, loss

        rng = jax.random.key(o.seed + 1)
        metric = o.best_metric or DEFAULT_METRIC[o.task]
        best, best_eval = None, None  # score and (results, predictions) of the best params
        params = self.params
        first_eval = o.eval_files[0] if o.eval_files else None
        lrs = np.asarray(jax.vmap(optim.schedule(ocfg))(jnp.arange(total)))  # optax counts from 0
        log = StepLog(wd / "metrics.jsonl")
        for s, idx in enumerate(batch_order(n, o.batch_size, total, o.seed), start=1):
            batch = {k: jnp.asarray(v[idx]) for k, v in self.train.items()}
            params, opt_state, loss = step(params, opt_state, batch, jax.random.fold_in(rng, s))
            rec = {"step": s, "loss": loss, "learning_rate": float(lrs[s - 1])}
            evaluate = first_eval and ((o.eval_every and s % o.eval_every == 0) or s == total)
            if evaluate:
                res, preds = self.evaluate(params, first_eval[1])
                rec.update({f"eval_{first_eval[0]}_{k}": v for k, v in res.items()})
                if improves(res[metric], best):
                    best, best_eval = res[metric], (res, preds)
                    self._save_best(params, wd)
            log.add(rec, now=bool(evaluate))
        log.flush()
        if not first_eval:
            self._save_best(params, wd)
        self.params = params
        best_params = None
        results = {}
        (wd / "eval").mkdir(exist_ok=True)
        for name, path in o.eval_files:
            if (name, path) == first_eval:  # scored when it was saved
                res, preds = best_eval
            else:
                best_params = best_params or convert.load(wd / "best")[2]
                res, preds = self.evaluate(best_params, path)
            results[name] = res
            self._write_eval(wd / "eval", name, res, preds)
        summary = {"steps": total, "best": {metric: best}, "eval": results,
                   "final_train_loss": log.last["loss"], "workdir": str(wd)}
        (wd / "results.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _plan(self) -> tuple[pathlib.Path, int, int, int]:
        """The workdir (created), training rows, warmup steps and total optimizer steps:
        `epochs` x whole batches per epoch (at least one), the first warmup_proportion
        of them warming up."""
        o = self.o
        wd = pathlib.Path(o.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        n = len(self.train["input_ids"])
        total = max(int(round(o.epochs * max(n // o.batch_size, 1))), 1)
        return wd, n, int(o.warmup_proportion * total), total

    def _save_best(self, params, wd: pathlib.Path) -> None:
        tmp = wd / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        convert.save_ours(tmp, self.cfg, self.mtask, jax.device_get(params), self.tok_dir,
                          source=f"finetune of {self.o.init_checkpoint}", labels=self.labels)
        shutil.rmtree(wd / "best", ignore_errors=True)
        tmp.rename(wd / "best")

    # ----------------------------------------------------------------- evaluate ----
    def predict_logits(self, params, feats: dict, batch_size: int = 64):
        """Logits of every row, in fixed-size batches (the last one padded), so one
        compiled program serves every evaluation."""
        if not hasattr(self, "_apply"):
            self._apply = jax.jit(lambda p, i, t, m: self.model.apply({"params": p}, i, t, m))
        n = len(feats["input_ids"])
        pad = lambda a: np.concatenate([a, np.zeros(((-len(a)) % batch_size,) + a.shape[1:], a.dtype)])
        ids, types, mask = (pad(np.asarray(feats[k])) for k in ("input_ids", "token_type_ids", "attention_mask"))
        outs = [jax.device_get(self._apply(params, ids[s:s + batch_size], types[s:s + batch_size],
                                           mask[s:s + batch_size]))
                for s in range(0, len(ids), batch_size)]
        if self.o.task == "qa":
            return np.concatenate([o[0] for o in outs])[:n], np.concatenate([o[1] for o in outs])[:n]
        return np.concatenate(outs)[:n]

    def evaluate(self, params, path) -> tuple[dict, Any]:
        o = self.o
        if o.task in ("classification", "regression"):
            ex = tasks.read_text_examples(path, o.text_column, o.label_column, o.pair_column,
                                          regression=o.task == "regression")
            if o.task == "classification":
                gold = tasks.label_ids(ex, self.labels)
                logits = self.predict_logits(params, text_features(self.tok, ex, o.max_seq_length, gold))
                pred = logits.argmax(-1)
                return metrics.classification(gold, pred), [self.labels[i] for i in pred]
            gold = [float(e.label) for e in ex]
            pred = self.predict_logits(params, text_features(self.tok, ex, o.max_seq_length, gold))[:, 0]
            return metrics.regression(gold, pred), pred.tolist()
        if o.task == "ner":
            sents = tasks.read_conll(path, o.tag_scheme)
            for s in sents:
                s.tags = tagging.convert(s.tags, o.tag_scheme, "IOB2")
            f = ner_features(self.tok, sents, o.max_seq_length, self.labels, o.output_scheme)
            first = f.pop("_first_token")
            logits = self.predict_logits(params, f)
            logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
            pred_tags = []
            for i, s in enumerate(sents):
                scores = np.stack([np.asarray(logp[i, j]) if j >= 0 else
                                   np.log(np.eye(len(self.labels))[0] + 1e-9) for j in first[i]])
                tags = tagging.viterbi(scores, self.labels, o.output_scheme)
                pred_tags.append(tagging.convert(tags, o.output_scheme, "IOB2"))
            res = metrics.entities([s.tags for s in sents], pred_tags, "IOB2")
            return res, [(s.words, s.tags, p) for s, p in zip(sents, pred_tags)]
        ex = tasks.read_squad(path)
        feats = squad.make_features(self.tok, ex, o.max_seq_length, o.doc_stride, o.max_query_length)
        f = dict(input_ids=feats.input_ids, token_type_ids=feats.token_type_ids, attention_mask=feats.attention_mask)
        start, end = self.predict_logits(params, f)
        preds = squad.predict_answers(ex, feats, start, end, o.n_best, o.max_answer_length, o.null_threshold)
        return metrics.squad(preds, {e.id: e.answers for e in ex}), preds

    def _write_eval(self, folder: pathlib.Path, name: str, res: dict, preds) -> None:
        """eval/NAME.json (the metrics) and the predictions beside it."""
        (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
        o = self.o
        if o.task == "qa":  # the official {id: answer} file
            (folder / f"{name}.predictions.json").write_text(json.dumps(preds, indent=1))
        elif o.task == "ner":
            lines = []
            for words, gold, pred in preds:
                out_gold = tagging.convert(gold, "IOB2", o.tag_scheme)
                out_pred = tagging.convert(pred, "IOB2", o.tag_scheme)
                lines += [f"{w} {g} {p}" for w, g, p in zip(words, out_gold, out_pred)] + [""]
            (folder / f"{name}.predictions.conll").write_text("\n".join(lines))
        else:
            (folder / f"{name}.predictions.tsv").write_text("prediction\n" + "\n".join(map(str, preds)) + "\n")


RUN_RECORD = "run.json"
RUN_OUTPUTS = ("metrics.jsonl", "results.json", "eval", "best", "best.tmp")


def run_record(o: FinetuneOptions) -> dict:
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(o).items() if k != "workdir"}))


def check_workdir(wd: pathlib.Path, o: FinetuneOptions) -> dict | None:
    """A workdir holds one run. One of another run (other options) is refused, naming the
    options that differ; a finished one of this run returns its results; an unfinished one
    starts over cleanly (its partial outputs are removed, so metrics.jsonl never mixes two
    runs) and None is returned."""
    record = wd / RUN_RECORD
    new = run_record(o)
    if record.exists():
        old = json.loads(record.read_text())
        diff = [f"--{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise FinetuneError(f"--workdir={wd} holds another fine-tuning run ({'; '.join(diff)}); "
                                "use a new --workdir")
        if (wd / "results.json").exists():
            return json.loads((wd / "results.json").read_text())
    elif any((wd / name).exists() for name in RUN_OUTPUTS):
        raise FinetuneError(f"--workdir={wd} holds outputs of a run with no record ({RUN_RECORD}); "
                            "use a new --workdir")
    for name in RUN_OUTPUTS:
        path = wd / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    record.write_text(json.dumps(new, indent=1))
    return None


def load_backbone(fresh: dict, source: dict, where: str) -> dict:
    """`fresh` task params with the backbone taken from `source`; every backbone param
    must exist in the source with the same shape (errors name it). A pooler the source
    lacks (RoBERTa pretraining) stays freshly initialised."""
    out = dict(fresh)
    src = source.get("backbone")
    if src is None:
        raise FinetuneError(f"--init_checkpoint={where}: no backbone params")
    merged = {}
    for k, v in fresh["backbone"].items():
        if k not in src:
            if k == "pooler":
                logging.warning("%s has no pooler; the pooler starts fresh", where)
                merged[k] = v
                continue
            raise FinetuneError(f"--init_checkpoint={where}: param backbone/{k} is missing")
        try:
            rename.check_shapes(src[k], v)
        except rename.RenameError as e:
            raise FinetuneError(f"--init_checkpoint={where}: {e} (under backbone/{k})") from None
        merged[k] = jax.tree.map(jnp.asarray, src[k])
    out["backbone"] = merged
    return out


def improves(score: float, best: float | None) -> bool:
    """Whether `score` beats `best` (None before the first evaluation, which always
    counts; a NaN score, e.g. the correlation of constant predictions, never beats a number)."""
    if best is None:
        return True
    return not np.isnan(score) and (np.isnan(best) or score > best)


class StepLog:
    """Appends one JSON line per step to `path`. Losses stay on the device until a block
    of `every` steps is written, so logging does not stall asynchronous dispatch."""

    def __init__(self, path: pathlib.Path, every: int = 100):
        self.path, self.every, self.pending, self.last = path, every, [], None

    def add(self, rec: dict, now: bool = False) -> None:
        self.pending.append(rec)
        if now or len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        with open(self.path, "a") as f:
            for rec in self.pending:
                rec = dict(rec, loss=float(rec["loss"]))
                f.write(json.dumps(rec) + "\n")
                if not np.isfinite(rec["loss"]):
                    self.pending = []
                    raise FinetuneError(
                        f"step {rec['step']}: the training loss is {rec['loss']}; stopping (lower "
                        "--learning_rate?). Only params that scored a finite evaluation were kept in best/")
        self.last, self.pending = rec, []


def batch_order(n: int, batch_size: int, total: int, seed: int):
    """Each step's row indices: seeded permutations of the n rows, consumed in order
    across epoch boundaries (no partial batches)."""
    rng = np.random.default_rng(seed)
    perm = np.array([], np.int64)
    for _ in range(total):
        if len(perm) < batch_size:
            perm = np.concatenate([perm, rng.permutation(n)])
        idx, perm = perm[:batch_size], perm[batch_size:]
        yield idx


def subsample(items: list, n: int | None, rng) -> list:
    if n is None or n >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]
