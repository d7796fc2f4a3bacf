"""Fine-tuning and evaluation, as the BERT paper does it: the pretrained encoder plus a
fresh task head, AdamW with linear warmup then linear decay, dropout, evaluation every N
steps and at the end, best-checkpoint selection on one metric of one named eval set.

The task types (classification, regression, ner, qa) are objects in finetune_tasks.py;
this module is the run: read and check every input before the first step, train,
evaluate, keep the best params, write the outputs. `predict` and the Hugging Face peer
use the same readers, features, decoding and output files.

Writes <workdir>/metrics.jsonl, <workdir>/best/ (our checkpoint folder of the best params,
with tokenizer and the task options that `predict` reuses), and per eval file
eval/NAME.json + eval/NAME.predictions.*.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from bert_jax import checkpoint, options, sharding, storage
from bert_jax.data import loader
from bert_jax.data.tokenizer import Tokenizer
from bert_jax.errors import BertJaxError
from bert_jax.interop import convert
from bert_jax.model.heads import build_model, init_params
from bert_jax.options import FinetuneOptions
from bert_jax.tasks import finetune_tasks
from bert_jax.tasks.finetune_tasks import INPUTS, Features, Task
from bert_jax.training import loop, optim, runlog, train

TASKS = tuple(finetune_tasks.TASKS)
TASK_FILE = "finetune.json"
EVAL_BATCH = 64               # rows per evaluation forward pass (rounded up to the data shards)   # in best/: the options predict rebuilds the task from


class FinetuneError(BertJaxError, ValueError):
    """Bad options or a checkpoint that does not fit; the message names what."""


# ------------------------------------------------------------- inputs, checked ----
@dataclasses.dataclass
class Inputs:
    """Everything a run reads, read and checked before its first step."""
    labels: list[str]
    num_labels: int
    train: dict[str, np.ndarray]                       # features and targets
    train_examples: int
    evals: dict[str, tuple[list, Features]]            # name -> (examples, features)


def check_input_files(o: FinetuneOptions) -> None:
    """Every input file exists: checked before a checkpoint is loaded."""
    for name, path in [("--train_file", o.train_file)] + [(f"--eval_files={n}", p) for n, p in o.eval_files]:
        if storage.is_remote(path):
            raise FinetuneError(f"{name}={path}: task files are read locally; copy it to a local file")
        if not pathlib.Path(path).is_file():
            raise FinetuneError(f"{name}={path}: no such file")


def read_inputs(o: FinetuneOptions, task: Task, tok: Tokenizer) -> Inputs:
    """The (seeded subsample of the) training file and every eval file, as features.
    A malformed row, or an eval label the model will not know (e.g. one that only rare
    examples carry, dropped by --max_train_examples), is an error naming file and line."""
    check_input_files(o)
    ex = subsample(task.read(o.train_file, training=True), o.max_train_examples, np.random.default_rng(o.seed))
    labels = task.label_set(ex)
    train = task.features(tok, ex, labels).arrays
    if len(train["input_ids"]) == 0:
        raise FinetuneError(f"--train_file={o.train_file}: no usable training example "
                            "(every one was skipped; the log says why)")
    evals = {}
    for name, path in o.eval_files:
        eval_ex = task.read(path)
        task.check(eval_ex, labels)
        evals[name] = (eval_ex, task.features(tok, eval_ex, labels))
    return Inputs(labels, task.num_labels(labels), train, len(ex), evals)


def selection_set(o: FinetuneOptions) -> str | None:
    """The eval set that chooses the best params: --select_on, else the first eval file
    (said in the log). One that looks like a test set is warned about."""
    names = [n for n, _ in o.eval_files]
    if o.select_on is not None and o.select_on not in names:
        raise FinetuneError(f"--select_on={o.select_on}: not one of the --eval_files names {names}")
    name = o.select_on or (names[0] if names else None)
    if name is None:
        return None
    if o.select_on is None:
        logging.warning("choosing the best checkpoint on %r (the first --eval_files entry); "
                        "name the set with --select_on", name)
    path = dict(o.eval_files)[name]
    if "test" in name.lower() or "test" in pathlib.Path(path).name.lower():
        logging.warning("--select_on: %r (%s) looks like a test set; choosing the best checkpoint "
                        "on it makes its score optimistic: select on a dev set", name, path)
    return name


def plan(o: FinetuneOptions, n: int) -> tuple[int, int]:
    """(warmup steps, total optimizer steps): `epochs` x whole batches per epoch (at
    least one), the first warmup_proportion of them warming up."""
    total = max(int(round(o.epochs * max(n // o.batch_size, 1))), 1)
    return int(o.warmup_proportion * total), total


def optim_config(o: FinetuneOptions, n: int) -> optim.OptimConfig:
    """The optimizer of a run on `n` training rows: the optimizer options as given (the
    same flags as pretraining's), the rate and warmup of fine-tuning."""
    warmup, total = plan(o, n)
    given = {f.name: getattr(o, f.name) for f in dataclasses.fields(options.OptimizerOptions)}
    return optim.OptimConfig(**given, learning_rate=o.learning_rate, warmup_steps=warmup, train_steps=total)


# --------------------------------------------------- running a model on features ----
def length_buckets(lengths: np.ndarray, batch_size: int, max_len: int, step: int = 32):
    """(row indices, padded length) per batch: rows sorted by length (longest first, ties
    in input order), each batch padded to its longest row rounded up to `step`, so short
    inputs cost little and few shapes get compiled."""
    order = np.argsort(-lengths, kind="stable")
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        yield idx, min(max_len, -(-int(lengths[idx].max()) // step) * step)


def run_model(apply: Callable, feats: Features, batch_size: int, max_len: int):
    """The model's outputs for every row of `feats`, in row order. `apply(ids, types,
    mask)` gets fixed-size batches (the last one padded with copies of a row) cut to a
    bucket length; outputs of sequence length are padded back to `max_len` (span QA with
    -1e9, which no answer search picks)."""
    arrays = {k: np.asarray(feats.arrays[k]) for k in INPUTS}
    n = len(arrays["input_ids"])
    lengths = arrays["attention_mask"].sum(1)
    results = None
    for idx, width in length_buckets(lengths, batch_size, max_len):
        rows = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        out = apply(*(arrays[k][rows, :width] for k in INPUTS))
        out = out if isinstance(out, tuple) else (out,)
        out = [np.asarray(jax.device_get(x))[:len(idx)] for x in out]
        if results is None:
            results = [None] * len(out)
        for j, x in enumerate(out):
            if x.ndim >= 2 and x.shape[1] == width and width < max_len:
                pad = [(0, 0), (0, max_len - width)] + [(0, 0)] * (x.ndim - 2)
                x = np.pad(x, pad, constant_values=-1e9 if x.ndim == 2 else 0.0)
            if results[j] is None:
                results[j] = np.zeros((n,) + x.shape[1:], x.dtype)
            results[j][idx] = x
    return results[0] if len(results) == 1 else tuple(results)


def evaluate(task: Task, apply: Callable, examples, feats: Features, labels, batch_size: int = 64):
    """(metrics, predictions) of a labeled set."""
    out = run_model(apply, feats, batch_size, task.o.max_seq_length)
    preds = task.decode(out, feats, examples, labels)
    return task.score(examples, preds, labels), preds


def write_eval(task: Task, folder: pathlib.Path, name: str, res: dict, examples, preds, labels) -> None:
    """eval/NAME.json (the metrics) and the predictions beside it."""
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(res, indent=1))
    out = task.output_file(folder, name)
    if not storage.is_remote(out):
        task.write(out, examples, preds, labels)
        return
    with tempfile.TemporaryDirectory(prefix="bert_jax_eval_") as tmp:  # written locally, uploaded
        local = pathlib.Path(tmp) / out.name
        task.write(local, examples, preds, labels)
        out.write_bytes(local.read_bytes())


# ------------------------------------------------------------------ the run ----
class Finetuner:
    def __init__(self, o: FinetuneOptions):
        if o.task not in TASKS:
            raise FinetuneError(f"--task={o.task!r}: must be one of {TASKS}")
        self.o, self.task = o, finetune_tasks.make(o)
        if o.best_metric is not None and o.best_metric not in self.task.metrics:
            raise FinetuneError(f"--best_metric={o.best_metric!r}: {o.task} reports {self.task.metrics}")
        self.select_on = selection_set(o)
        check_input_files(o)
        # before the first program (the init below) compiles
        train.use_compilation_cache(o.compilation_cache, storage.path(o.workdir) if o.workdir else None)
        if not storage.path(o.init_checkpoint).is_dir():
            raise FinetuneError(f"--init_checkpoint={o.init_checkpoint}: no such folder")
        src_cfg, _, src_params, tok_dir = convert.load(o.init_checkpoint)
        if tok_dir is None:
            raise FinetuneError(f"--init_checkpoint={o.init_checkpoint} carries no tokenizer")
        self.tok_dir, self.tok = tok_dir, Tokenizer.load(tok_dir)
        self.inputs = read_inputs(o, self.task, self.tok)
        self.labels, self.num_labels, self.train = self.inputs.labels, self.inputs.num_labels, self.inputs.train
        changes = dict(num_labels=self.num_labels, dtype=o.dtype)
        if o.dropout is not None:
            changes.update(hidden_dropout_prob=o.dropout, attention_probs_dropout_prob=o.dropout)
        self.cfg = src_cfg.replace(**changes)
        self.cfg.check_sequence_length(o.max_seq_length)
        self.mtask = self.task.model_task
        self.model = build_model(self.cfg, self.mtask)
        self.mesh = sharding.make_mesh(o.mesh_data, o.mesh_fsdp, o.mesh_tensor)
        train.check_batch(o.batch_size, 1, self.mesh)
        self.tx = optim.make(self.optim_config())
        self.abstract, self.state_sh = train.state_shardings(self.cfg, self.tx, o.max_seq_length,
                                                             self.mesh, self.mtask)
        if o.from_scratch:
            logging.warning("--from_scratch: the backbone of %s is not loaded; it starts from a random "
                            "init (seed %d)", o.init_checkpoint, o.seed)
            fresh = nn.unbox(init_params(self.cfg, self.mtask, jax.random.key(o.seed)))
        else:  # the parts the checkpoint supplies are not initialised (memory and time), only shaped
            loaded = frozenset(src_params.get("backbone", {}))
            fresh = nn.unbox(init_params(self.cfg, self.mtask, jax.random.key(o.seed), skip=loaded))
            shapes = self.abstract.params["backbone"]
            fresh["backbone"] = {k: fresh["backbone"].get(k, shapes[k]) for k in shapes}
            fresh = load_backbone(fresh, src_params, o.init_checkpoint)
        self.params = jax.tree.map(np.asarray, fresh)
        # Evaluation batches are split over the data-parallel devices like training's; the
        # outputs come back whole to every process.
        rep, rows = NamedSharding(self.mesh, P()), sharding.data_sharding(self.mesh, 2)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.eval_batch = -(-EVAL_BATCH // shards) * shards
        apply = jax.jit(lambda p, i, t, m: self.model.apply({"params": p}, i, t, m),
                        in_shardings=(self.state_sh.params, rows, rows, rows), out_shardings=rep)
        place = lambda x: train.place(x, rows)
        self.apply = lambda params: (lambda i, t, m: apply(params, place(i), place(t), place(m)))

    def optim_config(self) -> optim.OptimConfig:
        return optim_config(self.o, len(self.train["input_ids"]))

    def run(self) -> dict:
        """Fine-tune and evaluate in o.workdir, holding its lock. A workdir of a finished
        run with the same options returns that run's results; one of another run is
        refused (check_workdir)."""
        wd = storage.path(self.o.workdir)  # a local folder or an object-store URI (gs://...)
        wd.mkdir(parents=True, exist_ok=True)
        with checkpoint.WorkdirLock(wd, "finetune"):
            chief = jax.process_index() == 0
            finished = check_workdir(wd, self.o) if chief else None
            if jax.process_count() > 1:  # process 0 has checked (and cleaned) the workdir
                multihost_utils.sync_global_devices("finetune check_workdir")
                if not chief and (wd / "results.json").exists():
                    finished = json.loads((wd / "results.json").read_text())
            if finished is not None:
                logging.info("%s already holds this run's results", wd)
                return finished
            return self._run()

    def announce(self, total: int, warmup: int) -> None:
        o, inp = self.o, self.inputs
        n = len(inp.train["input_ids"])
        logging.info("finetune %s: %d training rows -> %d features; %d steps (%.3g epochs of %d "
                     "batches of %d, %d warmup); eval: %s", o.task, inp.train_examples, n, total,
                     o.epochs, max(n // o.batch_size, 1), o.batch_size, warmup,
                     ", ".join(f"{k} {len(e)} rows -> {len(f)} features" for k, (e, f) in inp.evals.items())
                     or "none")

    def _initial_state(self):
        """The state at step 0 on the mesh around the loaded backbone and the fresh head
        (self.params); its dropout key is split from --seed as pretraining's is."""
        placed = jax.tree.map(train.place, self.params, self.state_sh.params)
        self.params = None  # the host copy: 1x the params of peak memory, the state holds them now
        return train.state_around(placed, self.tx, self.o.seed, self.state_sh, self.mesh)

    def _run(self) -> dict:
        o, task, mesh = self.o, self.task, self.mesh
        wd = storage.path(o.workdir)
        chief = jax.process_index() == 0
        n = len(self.train["input_ids"])
        warmup, total = plan(o, n)
        self.announce(total, warmup)
        batch_sh = lambda ndim: sharding.data_sharding(mesh, ndim)
        example = {k: np.zeros((o.batch_size,) + v.shape[1:], v.dtype) for k, v in self.train.items()}
        model = self.model

        def loss_fn(params, mb, rng, _):
            out = model.apply({"params": params}, mb["input_ids"], mb["token_type_ids"],
                              mb["attention_mask"], deterministic=False, rngs={"dropout": rng})
            return task.loss(out, mb), {}

        step_fn = train.make_step(loss_fn, self.tx, 1, self.state_sh, batch_sh, example, mesh)
        ckpt = checkpoint.Checkpointer(wd, o.keep_checkpoints, o.async_checkpoint)
        restored = loop.restore(ckpt, self.abstract, self.state_sh)
        best = runlog.Best(o.best_metric or task.default_metric)
        if restored is not None:
            start, state, saved, saved_manifest = restored
            best.score = saved_manifest.get("best", saved.get("best"))  # older checkpoints: in data
            logging.info("resuming from %s at step %d", ckpt.dir / str(start), start)
        else:
            start, state = 0, self._initial_state()
        manifest = dict(options=run_record(o), git_revision=checkpoint.git_revision(),
                        packages=checkpoint.package_versions(), model_config=dataclasses.asdict(self.cfg),
                        init_checkpoint=str(o.init_checkpoint),
                        data=train.file_fingerprint([o.train_file] + [p for _, p in o.eval_files]),
                        devices=str(jax.devices()[:4]), process_count=jax.process_count())
        if restored is not None:
            try:
                check_same_data(saved_manifest.get("data"), manifest["data"], o)
            except FinetuneError:
                ckpt.close()
                raise
        loop.write_record(wd, manifest, o.resolved_flags)
        lr_fn = optim.schedule(self.optim_config())
        log = runlog.RunLog(wd, total=total, start=start, desc=f"finetune {o.task}", progress_bar=o.progress_bar,
                            max_nonfinite_streak=o.max_nonfinite_streak, lr_fn=lr_fn)
        order = batch_order(n, o.batch_size, total, o.seed)
        for _ in range(start):  # the data order continues where the checkpoint left it
            next(order)
        # the next batches are placed on the devices while the current step runs
        prefetch = loader.DevicePrefetcher(order, place=lambda idx: train.global_batch(self.train, idx, batch_sh))
        scored = {}  # the selection set's last (results, predictions), and those of the best params

        def select(params):
            ex, feats = self.inputs.evals[self.select_on]
            scored["last"] = evaluate(task, self.apply(params), ex, feats, self.labels, self.eval_batch)
            return scored["last"][0]

        def save_best(_, params):
            self._save_best(params, wd)
            scored["best"] = scored["last"]

        cadence = loop.Cadence(total, o.log_every, o.eval_every, o.checkpoint_every, o.stop_at_step)
        out = loop.run(state, start=start, cadence=cadence, batches=prefetch, step_fn=step_fn, log=log, ckpt=ckpt,
                       manifest=manifest, evaluation=loop.Evaluation(self.select_on, select, best, save_best)
                       if self.select_on else None, unlogged_transfers=o.unlogged_transfers, mesh=mesh)
        loop.check_trained(out, start, ckpt, FinetuneError, o, o.learning_rate)
        state, s, best_eval = out.state, out.step, scored.get("best")
        if s < total:
            logging.warning("stopped at step %d of %d with a checkpoint; rerun the same command to resume", s, total)
            return {"steps": total, "step": s, "stopped_early": True, "workdir": str(wd)}
        if not self.select_on:
            self._save_best(state.params, wd)
        self.params = state.params
        best_params = None
        results = {}
        for name, (ex, feats) in self.inputs.evals.items():
            if name == self.select_on and best_eval is not None:  # scored when it was saved
                res, preds = best_eval
            else:
                if best_params is None:
                    best_params = jax.device_put(convert.load(wd / "best")[2], self.state_sh.params)
                res, preds = evaluate(task, self.apply(best_params), ex, feats, self.labels, self.eval_batch)
            results[name] = res
            if chief:
                write_eval(task, wd / "eval", name, res, ex, preds, self.labels)
        summary = {"steps": total, "best": {best.metric: best.score}, "selected_on": self.select_on,
                   "eval": results, "final_train_loss": last_loss(log.path), "workdir": str(wd)}
        if chief:
            (wd / "results.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _save_best(self, params, wd: pathlib.Path) -> None:
        """best/: our checkpoint folder of `params`, with the task options predict reuses."""
        def write(tmp, host):
            convert.save_ours(tmp, self.cfg, self.mtask, host, self.tok_dir,
                              source=f"finetune of {self.o.init_checkpoint}", labels=self.labels)
            (tmp / TASK_FILE).write_text(json.dumps(run_record(self.o), indent=1))
        runlog.publish(wd / "best", params, write)


RUN_RECORD = "run.json"
RUN_OUTPUTS = ("metrics.jsonl", "results.json", "eval", "best", "best.tmp", "checkpoints",
               "checkpoints.corrupt", "manifest.json", "flags.txt", "tensorboard")


def run_record(o: FinetuneOptions) -> dict:
    """The options that decide what the run computes, by flag name: all but those that may
    change on resume (options.resume_rules: the mesh, the processes, what is logged and kept)."""
    rules = options.resume_rules(o)
    return json.loads(json.dumps({k: v for k, v in options.flat(o).items() if rules[k] != options.MAY_CHANGE}))


# What a run recorded before these options existed used: its run.json resumes with them.
OPTIONS_BEFORE_THEY_EXISTED = dict(optimizer="adamw", decay_power=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-6,
                                   max_grad_norm=1.0)


def check_workdir(wd: pathlib.Path, o: FinetuneOptions) -> dict | None:
    """A workdir holds one run. One of another run (other options) is refused, naming the
    options that differ; a finished one of this run returns its results; an unfinished one
    with a checkpoint resumes from it; one without starts over cleanly (its partial outputs
    are removed, so metrics.jsonl never mixes two runs). Process 0 alone calls it."""
    record = wd / RUN_RECORD
    new = run_record(o)
    if record.exists():
        old = {**OPTIONS_BEFORE_THEY_EXISTED, **json.loads(record.read_text())}
        rules = options.resume_rules(o)  # a record written before an option could change keeps it
        diff = [f"--{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
                if rules.get(k) != options.MAY_CHANGE and old.get(k) != new.get(k)]
        if diff:
            raise FinetuneError(f"--workdir={wd} holds another fine-tuning run ({'; '.join(diff)}); "
                                "use a new --workdir")
        if (wd / "results.json").exists():
            return json.loads((wd / "results.json").read_text())
        if checkpoint.has_checkpoint(wd):
            return None
    elif any((wd / name).exists() for name in RUN_OUTPUTS):
        raise FinetuneError(f"--workdir={wd} holds outputs of a run with no record ({RUN_RECORD}); "
                            "use a new --workdir")
    for name in RUN_OUTPUTS:
        path = wd / name
        if path.is_dir():
            storage.rmtree(path)
        elif path.exists():
            path.unlink()
    record.write_text(json.dumps(new, indent=1))
    return None


def check_same_data(saved: dict | None, now: dict, o: FinetuneOptions) -> None:
    """A resumed run trains and evaluates on the files it started with: a file whose bytes
    changed (sha256 recorded in the checkpoint's manifest) is an error naming its flag."""
    flag = {o.train_file: "--train_file", **{p: f"--eval_files={n}" for n, p in o.eval_files}}
    changed = [f"{flag.get(p, p)}={p}" for p in now if saved and p in saved and saved[p] != now[p]]
    if changed:
        raise FinetuneError(f"{', '.join(changed)} changed since this run started in --workdir={o.workdir} (its "
                            "sha256 differs from the one recorded at the start): a resumed run trains on the data it "
                            "started with; put the file back, or use a new --workdir")


def load_backbone(fresh: dict, source: dict, where: str) -> dict:
    """`fresh` task params with the backbone taken from `source`; every backbone param
    must exist in the source with the same shape (errors name it). A pooler the source
    lacks (RoBERTa pretraining) stays freshly initialised."""
    backbone, pooler_fresh = train.take_backbone(fresh["backbone"], source, where,
                                                 lambda src, _: jax.tree.map(jnp.asarray, src), FinetuneError)
    if pooler_fresh:
        logging.warning("%s has no pooler; the pooler starts fresh", where)
    return dict(fresh, backbone=backbone)


def last_loss(path: pathlib.Path) -> float | None:
    """The training loss of the last step in metrics.jsonl."""
    if not path.exists():
        return None
    losses = [json.loads(l) for l in path.read_text().splitlines() if l]
    return next((r["loss"] for r in reversed(losses) if "loss" in r), None)


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
