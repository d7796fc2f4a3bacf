"""The pretraining run: everything `pretrain` does, as importable functions.

run(opts) sets up (or resumes) a workdir, builds the data pipeline, creates the sharded
state, trains with periodic evaluation and checkpoints, and returns a summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging

from bert_jax import options, storage
from bert_jax.data import cache, corpus, instances, loader, masking
from bert_jax.data.tokenizer import FAMILY_KIND, Tokenizer
from bert_jax.data.tokenizer import copy_files as copy_tokenizer_files
from bert_jax.errors import BertJaxError
from bert_jax.interop import convert
from bert_jax.model import objectives
from bert_jax.model.config import ConfigError, ModelConfig, variant
from bert_jax.options import PretrainOptions
from bert_jax.training import checkpoint as ckpt_lib
from bert_jax.training import optim
from bert_jax.training import runlog
from bert_jax.training import sharding
from bert_jax.training import train


class PretrainError(BertJaxError, RuntimeError):
    """A run cannot go on; the message names the step and the last good checkpoint."""


# Options that may change when a run resumes: they decide how the run is observed,
# checkpointed, stopped or laid out on devices, not which model is trained on what data.
# (train_steps may grow to extend a run; the schedule follows it.) Every other option is
# compared with the checkpoint's record, and a difference is an error naming the flag.
RESUME_MAY_CHANGE = frozenset({
    "workdir", "heldout_corpus", "cache_dir", "train_steps", "stop_at_step", "mesh_data", "mesh_fsdp",
    "mesh_tensor", "checkpoint_every", "keep_checkpoints", "async_checkpoint", "log_every",
    "eval_every", "eval_batches", "max_nonfinite_streak", "progress_bar", "unlogged_transfers", "scan_layers",
    "coordinator_address", "num_processes", "process_id", "deterministic_gpu", "heartbeat_timeout",
    "compilation_cache", "prepare_only",
    "remat_policy", "attention_impl"})

# What a run recorded before these flags existed did: its checkpoints resume with them.
FLAGS_BEFORE_THEY_EXISTED = {"instances": "prebuilt", "static_masks": 0}


def flag_record(o: PretrainOptions) -> dict[str, Any]:
    """The options as {flag name: value} (JSON values), as the run record stores them."""
    return json.loads(json.dumps(options.flat(o)))


def check_resume(o: PretrainOptions, manifest: dict, tok: Tokenizer, where: pathlib.Path) -> None:
    """A resumed run must be the run its checkpoint started: same tokenizer, same flags
    except RESUME_MAY_CHANGE. Errors name every flag that differs."""
    if manifest.get("tokenizer_fingerprint") not in (None, tok.fingerprint()):
        raise PretrainError(f"{where} was trained with tokenizer {manifest['tokenizer_fingerprint']}, "
                            f"but the workdir's tokenizer is now {tok.fingerprint()}; use a new --workdir")
    old = manifest.get("options")
    if old is None:
        logging.warning("%s records no options (an older checkpoint): flags not compared", where)
        return
    old = {**FLAGS_BEFORE_THEY_EXISTED, **old}
    new = flag_record(o)
    diff = [f"--{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in RESUME_MAY_CHANGE and old.get(k) != new.get(k)]
    if diff:
        raise PretrainError(f"--workdir={o.workdir} holds a run with other options ({where}): "
                            + "; ".join(diff) + ". Resume with the same flags, or use a new --workdir")


def model_config(o: PretrainOptions, tokenizer: Tokenizer) -> ModelConfig:
    overrides = o.model.overrides()
    base = variant(o.model.variant)
    overrides.setdefault("vocab_size", tokenizer.vocab_size)
    overrides.setdefault("pad_token_id", tokenizer.pad_id)
    cfg = base.replace(**overrides)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({o.tokenizer or 'workdir tokenizer'})")
    if FAMILY_KIND[cfg.family] != tokenizer.kind:
        logging.warning("family %s usually uses a %s tokenizer, this one is %s",
                        cfg.family, FAMILY_KIND[cfg.family], tokenizer.kind)
    cfg.check_sequence_length(o.max_seq_length)
    return cfg


def _first_process_then_all(name: str, fn):
    """Run `fn` on process 0, then on the others once it is done (they find its output
    on the shared filesystem: tokenizer, corpus cache)."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils
    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices(name)
    return out if jax.process_index() == 0 else fn()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def prepare_tokenizer(o: PretrainOptions, workdir, local_root: pathlib.Path) -> tuple[Tokenizer, pathlib.Path]:
    return _first_process_then_all("tokenizer", lambda: _prepare_tokenizer(o, workdir, local_root))


def _prepare_tokenizer(o: PretrainOptions, workdir, local_root: pathlib.Path) -> tuple[Tokenizer, pathlib.Path]:
    """The run's tokenizer, copied into <workdir>/tokenizer. Trained from the corpus
    (WordPiece unless the variant's family says otherwise) when no folder is given. Returns
    it with a local folder of its files: <workdir>/tokenizer itself, or for a workdir on an
    object store a copy under `local_root` (the tokenizers library reads local files)."""
    dest = workdir / "tokenizer"
    remote = storage.is_remote(dest)
    local = (local_root / "remote" / f"{storage.slug(dest)}.p{jax.process_index()}") if remote else dest
    if dest.exists() and any(dest.iterdir()):
        # The tokenizer its checkpoints were trained with (check_resume compares flags and
        # fingerprint); other processes take what process 0 decided and wrote.
        if ckpt_lib.has_checkpoint(workdir) or jax.process_index() != 0:
            if remote:
                storage.rmtree(local)
                storage.copy_tree(dest, local)
            return Tokenizer.load(local), local
        # No checkpoint used it: a left-over of a run that failed before its first save,
        # possibly built from other flags or a bad corpus. Build it again from these flags.
        logging.warning("%s has no checkpoint yet: rebuilding its tokenizer from the flags", workdir)
        storage.rmtree(dest)
    storage.rmtree(local)
    if o.tokenizer:
        copy_tokenizer_files(o.tokenizer, local)
        tok = Tokenizer.load(local)
    else:
        from bert_jax.data import vocab
        kind = FAMILY_KIND[variant(o.model.variant).family]
        logging.info("no --tokenizer: training a %s vocabulary of %d on --corpus", kind, o.tokenizer_vocab_size)
        tok = vocab.train(kind, o.corpus, o.tokenizer_vocab_size, local, lowercase=o.lowercase)
    if remote:
        storage.copy_tree(local, dest)
    return tok, local


def make_source(o: PretrainOptions, cfg: ModelConfig, tok: Tokenizer, tok_dir, corpus_glob,
                seed: int, cache_dir: pathlib.Path, flag: str) -> loader.PretrainSource:
    files = corpus.expand(corpus_glob, flag)
    build = lambda boundary: cache.build(files, tok, tok_dir, cache_dir, boundary, splitter=o.sentence_splitter,
                                         process_index=jax.process_index(), process_count=jax.process_count(),
                                         barrier=_barrier)
    tc = build(o.document_boundary)  # every process prepares its share of the files
    objective = cfg.pretraining_objective
    if objective.needs_documents and tc.num_documents < 2 and o.document_boundary == "file":
        # NSP draws random next segments from other documents: one file is one document.
        logging.warning("%s has one document; --objective=%s needs several, so paragraphs (blank "
                        "lines) are taken as documents", flag, objective.name)
        tc = build("blank_line")
    icfg = instances.InstanceConfig(o.max_seq_length, objective.instance_kind, o.short_seq_prob)
    inst = instances.OnTheFly(tc, icfg, seed) if o.instances == "on_the_fly" else instances.build(tc, icfg, seed)
    pcfg = loader.PipelineConfig(max_seq_length=o.max_seq_length, objective=objective.instance_kind,
                                 global_batch_size=o.batch_size, seed=seed,
                                 position_offset=cfg.position_offset,
                                 max_examples_per_row=o.max_examples_per_row, static_masks=o.static_masks)
    mcfg = masking.MaskingConfig(o.masked_lm_prob, o.max_predictions_per_seq,
                                 o.whole_word_masking, o.max_ngram)
    specials = instances.SpecialIds(tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id)
    return loader.PretrainSource(tc, inst, pcfg, mcfg, specials, tok.vocab_size,
                                 jax.process_index(), jax.process_count())


def evaluate(eval_step, params, source: loader.PretrainSource, n_batches: int, batch_sharding,
             objective: objectives.Objective) -> dict:
    """Held-out MLM loss/accuracy and NSP/SOP accuracy over the first `n_batches`
    batches of the held-out stream (fixed seed, so every evaluation sees the same data)."""
    it = loader.make_iterator(source)
    total: dict[str, float] = {}
    batches = [next(it) for _ in range(n_batches)]
    loader.close_iterator(it)  # its prefetch threads stop now, not at interpreter exit
    for b in batches:
        b = {k: jax.make_array_from_process_local_data(batch_sharding(v.ndim), v,
                                                        (source.cfg.global_batch_size,) + v.shape[1:])
             for k, v in b.items()}
        m = jax.device_get(eval_step(params, b))
        for k, v in m.items():
            total[k] = total.get(k, 0.0) + float(v)
    return objective.figures(total)


def run(o: PretrainOptions) -> dict:
    """Pretrain (or resume) in o.workdir, holding the workdir's lock throughout."""
    workdir = storage.path(o.workdir)  # a local folder or an object-store URI (gs://...)
    if storage.is_remote(workdir) and not o.cache_dir:
        raise PretrainError(f"--workdir={o.workdir} is on an object store: give --cache_dir, a local "
                            "folder for the prepared corpus and the tokenizer's local copy")
    if o.cache_dir:
        storage.require_local(o.cache_dir, "--cache_dir", "the prepared corpus is memory-mapped")
    workdir.mkdir(parents=True, exist_ok=True)
    with ckpt_lib.WorkdirLock(workdir, "pretrain"):
        return _run(o, workdir)


def _run(o: PretrainOptions, workdir: pathlib.Path) -> dict:
    mesh = sharding.make_mesh(o.mesh_data, o.mesh_fsdp, o.mesh_tensor)
    train.check_batch(o.batch_size, o.grad_accum, mesh)  # before any tokenizer or cache is built
    cache_dir = pathlib.Path(o.cache_dir) if o.cache_dir else workdir / "cache"
    # Compiled steps are kept locally: beside the corpus when the workdir is on a store.
    train.use_compilation_cache(o.compilation_cache, cache_dir if storage.is_remote(workdir) else workdir)
    tok, tok_dir = prepare_tokenizer(o, workdir, cache_dir)
    cfg = model_config(o, tok)
    ckpt_lib.check_same_architecture(workdir, cfg)
    objective = cfg.pretraining_objective
    best_metric = o.best_metric or "mlm_accuracy"
    if best_metric not in objective.logged:
        raise PretrainError(f"--best_metric={best_metric!r}: --objective={objective.name} reports {objective.logged}")
    src = make_source(o, cfg, tok, tok_dir, o.corpus, o.seed, cache_dir, "--corpus")
    held = (make_source(o, cfg, tok, tok_dir, o.heldout_corpus, 12345, cache_dir, "--heldout_corpus")
            if o.heldout_corpus else None)
    if o.prepare_only:
        logging.info("--prepare_only: tokenizer in %s, corpus prepared in %s", tok_dir, cache_dir)
        return {"prepared": str(cache_dir), "tokenizer": str(tok_dir)}

    ocfg = dataclasses.replace(o.optim, train_steps=o.train_steps)
    tx, lr_fn = optim.make(ocfg), optim.schedule(ocfg)
    abstract, state_sh = train.state_shardings(cfg, tx, o.max_seq_length, mesh)
    batch_sh = lambda ndim: sharding.data_sharding(mesh, ndim)
    ckpt = ckpt_lib.Checkpointer(workdir, o.keep_checkpoints, o.async_checkpoint)
    try:
        restored = ckpt.restore_latest(abstract, state_sh)
        if restored is not None:
            start, state, data_state, saved_manifest = restored
            check_resume(o, saved_manifest, tok, ckpt.dir / str(start))
            logging.info("resuming from %s at step %d", ckpt.dir / str(start), start)
    except Exception:
        ckpt.close()  # orbax's threads stop before the error propagates
        raise
    if restored is None:
        state, data_state = train.create_state(cfg, tx, o.max_seq_length, o.seed, mesh, state_sh), None
        start = 0
    chief = jax.process_index() == 0  # the one process that writes files other than checkpoints
    if chief:
        ckpt_lib.write_config(workdir, cfg)
    manifest = dict(flags=o.resolved_flags, options=flag_record(o), git_revision=ckpt_lib.git_revision(),
                    tokenizer_fingerprint=tok.fingerprint(), packages=ckpt_lib.package_versions(),
                    model_config=dataclasses.asdict(cfg), devices=str(jax.devices()[:4]),
                    process_count=jax.process_count())
    if chief:
        (workdir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (workdir / "flags.txt").write_text(o.resolved_flags)

    best = runlog.Best(best_metric, saved_manifest.get("best") if restored is not None else None)

    def save_best(step, params):
        runlog.publish(workdir / "best", params, lambda tmp, host: convert.save_ours(
            tmp, cfg, "pretraining", host, tok_dir, source=f"{workdir} step {step}, best held-out {best_metric}"))

    it = loader.make_iterator(src, data_state)
    example = {k: np.zeros((o.batch_size,) + v.shape, v.dtype) for k, v in src.example(0).items()}
    step_fn = train.make_train_step(cfg, tx, o.grad_accum, state_sh, batch_sh, example, mesh)
    eval_fn = train.make_eval_step(cfg)
    prefetch = loader.DevicePrefetcher(it, batch_sh, o.batch_size)
    log = runlog.RunLog(workdir, total=o.train_steps, start=start, desc="pretrain", progress_bar=o.progress_bar,
                        max_nonfinite_streak=o.max_nonfinite_streak, figures=objective.figures)
    summary: dict[str, Any] = {}
    last_saved, data_state_now = start, data_state
    in_flight = None
    try:
        with train.StopOnSigterm() as stop, jax.set_mesh(mesh):
            step = start
            while step < o.train_steps:
                batch, data_state_now = next(prefetch)
                nxt = step + 1
                logs = nxt % o.log_every == 0 or nxt == o.train_steps
                evals = held is not None and (nxt % o.eval_every == 0 or nxt == o.train_steps)
                stop_here = stop.requested or (o.stop_at_step is not None and nxt >= o.stop_at_step)
                saves = nxt % o.checkpoint_every == 0 or nxt == o.train_steps or stop_here
                # A step that logs, evaluates or saves nothing copies nothing to the host, so
                # dispatch runs ahead of the device (--unlogged_transfers=disallow checks it).
                quiet = not (logs or evals or saves)
                with (jax.transfer_guard_device_to_host(o.unlogged_transfers) if quiet
                      else contextlib.nullcontext()):
                    state, m = step_fn(state, batch)
                    log.add(m, state.nonfinite_streak)
                    in_flight = train.wait_previous(in_flight, m["loss"])
                step = nxt
                if stop.reached(step):  # SIGTERM (all processes agree on this step): save here
                    stop_here = saves = True
                elif quiet:
                    continue
                log.check(step, str(ckpt.dir / str(last_saved)) if last_saved else None)
                if logs:
                    log.train(step, lr_fn(step), nonfinite_total=int(state.nonfinite_total))
                if evals:
                    ev = evaluate(eval_fn, state.params, held, o.eval_batches, batch_sh, objective)
                    summary["heldout"] = ev
                    log.eval(step, "heldout", ev)
                    best.offer(ev, lambda: save_best(step, state.params))
                    logging.info("step %d held-out %s", step, ev)
                if stop_here:
                    stop.requested = True
                if stop.requested:  # also when SIGTERM came while this step logged or evaluated
                    saves = True
                if saves:
                    ckpt.save(step, state, data_state_now, dict(manifest, best=best.score), force=stop.requested)
                    last_saved = step
                if stop.requested:
                    break
            if held and "heldout" not in summary:  # nothing left to train: still report
                summary["heldout"] = evaluate(eval_fn, state.params, held, o.eval_batches, batch_sh, objective)
    finally:  # also on an error: in-flight checkpoint saves finish, threads stop
        prefetch.close()
        ckpt.close()
        log.close()
    summary.update(step=step, workdir=str(workdir), checkpoint=str(ckpt.dir / str(last_saved)),
                   metrics=str(log.path), stopped_early=stop.requested,
                   best={best_metric: best.score} if held else None)
    return summary
