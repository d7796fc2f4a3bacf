"""The pretraining run: everything `pretrain` does, as importable functions.

run(opts) sets up (or resumes) a workdir, builds the data pipeline, creates the sharded
state, trains with periodic evaluation and checkpoints, and returns a summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging

from bert_jax import checkpoint as ckpt_lib, options, sharding, storage
from bert_jax.data import cache, corpus, loader, masking, source
from bert_jax.data.tokenizer import FAMILY_KIND, Tokenizer, copy_files as copy_tokenizer_files
from bert_jax.errors import BertJaxError
from bert_jax.interop import convert
from bert_jax.model import objectives
from bert_jax.model.config import ConfigError, ModelConfig, variant
from bert_jax.options import PretrainOptions
from bert_jax.training import loop, optim, runlog, train


class PretrainError(BertJaxError, RuntimeError):
    """A run cannot go on; the message names the step and the last good checkpoint."""


# What a run recorded before these flags existed did: its checkpoints resume with them.
FLAGS_BEFORE_THEY_EXISTED = {"instances": "prebuilt", "static_masks": 0, "init_checkpoint": None,
                             "phase": 1, "phase_schedule": "continue"}


def flag_record(o: PretrainOptions) -> dict[str, Any]:
    """The options as {flag name: value} (JSON values), as the run record stores them (a
    run from scratch records the variant it used, also when --variant was left out)."""
    rec = json.loads(json.dumps(options.flat(o)))
    if not o.init_checkpoint:
        rec["variant"] = o.model.base_variant
    return rec


def check_resume(o: PretrainOptions, manifest: dict, tok: Tokenizer, where: pathlib.Path) -> bool:
    """A resumed run must be the run its checkpoint started: same tokenizer, same flags
    except those that may change on resume (options.resume_rules). With a --phase one
    above the checkpoint's, the run moves to that phase: the phase options may change too.
    Returns whether this starts a new phase. Errors name every flag that differs."""
    if manifest.get("tokenizer_fingerprint") not in (None, tok.fingerprint()):
        raise PretrainError(f"{where} was trained with tokenizer {manifest['tokenizer_fingerprint']}, "
                            f"but the workdir's tokenizer is now {tok.fingerprint()}; use a new --workdir")
    saved_phase = manifest.get("phase", 1)
    if o.phase < saved_phase or o.phase > saved_phase + 1:
        raise PretrainError(f"--phase={o.phase}: --workdir={o.workdir} is in phase {saved_phase} ({where}); "
                            f"resume it with --phase={saved_phase}, or move it on with --phase={saved_phase + 1}")
    new_phase = o.phase == saved_phase + 1
    old = manifest.get("options")
    if old is None:
        logging.warning("%s records no options (an older checkpoint): flags not compared", where)
        return new_phase
    old = {**FLAGS_BEFORE_THEY_EXISTED, **old}
    new = flag_record(o)
    rules = options.resume_rules(o)
    may = {options.MAY_CHANGE, options.PHASE} if new_phase else {options.MAY_CHANGE}
    diff = [f"--{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k != "phase" and rules.get(k, options.SAME) not in may and old.get(k) != new.get(k)]
    if diff:
        what = (f"moves to phase {o.phase}, but a new phase changes only its phase options "
                f"({', '.join('--' + k for k, r in sorted(rules.items()) if r == options.PHASE)})"
                if new_phase else "holds a run with other options")
        raise PretrainError(f"--workdir={o.workdir} {what} ({where}): " + "; ".join(diff)
                            + (". Keep the other flags of phase %d" % saved_phase if new_phase
                               else ". Resume with the same flags, or use a new --workdir"))
    return new_phase


def check_same_corpus(o: PretrainOptions, workdir) -> None:
    """A resumed run trains on the text it started with: --corpus files added, gone, or
    changed since (cache.changed_sources, against the manifest's record of each file) are
    an error naming them, before anything is prepared. A new --phase may change the corpus
    (its manifest records the new one)."""
    record = workdir / "manifest.json"
    if not record.exists():
        return
    saved = json.loads(record.read_text())
    if o.phase > saved.get("phase", 1) or not saved.get("corpus"):
        return
    changes = cache.changed_sources(saved["corpus"], corpus.expand(o.corpus, "--corpus"))
    if changes:
        raise PretrainError(f"--corpus of --workdir={o.workdir} is not the text its run started with: "
                            + "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
                            + ". A resumed run trains on the data it started with: put the files back, or use a new "
                            "--workdir (or a new --phase, which may change the corpus)")


def phase_seed(seed: int, phase: int) -> int:
    """The data seed of a phase: --seed in phase 1; a different stream in each later phase
    (rows, pairs and masks drawn anew for the new length)."""
    if phase == 1:
        return seed
    return int(hashlib.sha256(f"{seed}/phase{phase}".encode()).hexdigest()[:8], 16)


def phase_record(o: PretrainOptions, saved: dict, start: int, new_phase: bool) -> list[dict]:
    """The manifest's list of phases, one {phase, start_step, end_step?, options} each:
    the checkpoint's (a checkpoint from before phases: one phase from step 0), plus a new
    one starting at `start` when the run moves on; the current phase's options are these."""
    phases = [dict(p) for p in saved.get("phases") or ([dict(phase=1, start_step=0, options=saved["options"])]
                                                       if saved.get("options") else [])]
    if new_phase:
        phases[-1]["end_step"] = start
    if new_phase or not phases:
        phases.append(dict(phase=o.phase, start_step=start if new_phase else 0))
    phases[-1]["options"] = flag_record(o)
    return phases


# ------------------------------------------------------------ --init_checkpoint ----
@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
    """The model a run starts from: its config, task (heads.TASKS), params (host arrays)
    and tokenizer folder."""
    path: str
    cfg: ModelConfig
    task: str
    params: dict
    tok_dir: pathlib.Path


# Model options that a checkpoint decides: a flag given with another value is an error.
CHECKPOINT_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "embedding_size", "num_hidden_groups", "inner_group_num", "max_position_embeddings",
                    "share_scope", "hidden_act")


def load_init(o: PretrainOptions) -> InitCheckpoint:
    """--init_checkpoint read and checked against the flags (before any step)."""
    where = o.init_checkpoint
    if not storage.path(where).is_dir():
        raise PretrainError(f"--init_checkpoint={where}: no such folder")
    cfg, task, params, tok_dir = convert.load(where)
    if tok_dir is None:
        raise PretrainError(f"--init_checkpoint={where} carries no tokenizer (vocab.txt, vocab.json + merges.txt, "
                            "spiece.model or tokenizer.json): a model is continued with the tokenizer it was trained with")
    m = o.model
    if m.variant:
        v = variant(m.variant)
        if v.family != cfg.family:
            raise PretrainError(f"--variant={m.variant} is a {v.family} model, but --init_checkpoint={where} is a "
                                f"{cfg.family} model; leave --variant out (the checkpoint decides the model)")
        for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(m, f) is None and getattr(v, f) != getattr(cfg, f):
                raise PretrainError(f"--variant={m.variant} has {f}={getattr(v, f)}, but --init_checkpoint={where} "
                                    f"has {getattr(cfg, f)}; leave --variant out (the checkpoint decides the model)")
    for f in CHECKPOINT_SHAPE:
        given, theirs = getattr(m, f), cfg.embed_dim if f == "embedding_size" else getattr(cfg, f)
        if given is not None and given != theirs:
            raise PretrainError(f"--{f}={given}: --init_checkpoint={where} has {f}={theirs}; a model continued from "
                                f"a checkpoint keeps its shape (leave --{f} out)")
    if o.tokenizer:
        given, theirs = Tokenizer.load(o.tokenizer), Tokenizer.load(tok_dir)
        if given.fingerprint() != theirs.fingerprint():
            raise PretrainError(f"--tokenizer={o.tokenizer} ({given.kind}, {given.vocab_size} tokens, fingerprint "
                                f"{given.fingerprint()}) is not the tokenizer of --init_checkpoint={where} "
                                f"({theirs.kind}, {theirs.vocab_size} tokens, fingerprint {theirs.fingerprint()}): "
                                "leave --tokenizer out (the checkpoint's is used)")
    logging.info("--init_checkpoint=%s: a %s %s model; its tokenizer is used (--tokenizer_vocab_size and "
                 "--lowercase, which only shape a tokenizer trained here, are not used)", where, cfg.family, task)
    return InitCheckpoint(where, cfg, task, params, tok_dir)


def init_model_config(o: PretrainOptions, base: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model of a run from --init_checkpoint (or its resumption): the checkpoint's
    config (`base`) with what a continued run may choose: objective, dropout, execution."""
    m = o.model
    changes = {f: getattr(m, f) for f in ("objective", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                          "dtype", "remat_policy", "attention_impl") if getattr(m, f) is not None}
    cfg = base.replace(scan_layers=m.scan_layers, **changes)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
                          f"tokens (--init_checkpoint={o.init_checkpoint})")
    cfg.check_sequence_length(o.max_seq_length)
    return cfg


def merge_init(params, init: InitCheckpoint, cfg: ModelConfig):
    """The pretraining params `params` (a seeded random init, sharded) with every part that
    --init_checkpoint has put in its place: the encoder (required), the pooler, the MLM
    head, and the sentence head when it is the objective's (an NSP head is no SOP head).
    Parts it lacks keep their random init, with one warning naming them."""
    where, src = init.path, init.params
    same_sentence = (init.task == "pretraining"
                     and init.cfg.pretraining_objective.sentence_task == cfg.pretraining_objective.sentence_task)
    fresh, out = [], {}
    for top, sub in params.items():
        if top == "backbone":
            out[top], pooler_fresh = train.take_backbone(sub, src, where, _placed_as, PretrainError)
            fresh += ["pooler"] * pooler_fresh
        elif top in src and (top == "mlm" or same_sentence):
            out[top] = _placed(src[top], sub, where, top)
        else:
            fresh.append("MLM head" if top == "mlm" else f"{cfg.pretraining_objective.sentence_task.upper()} head")
            out[top] = sub
    if fresh:
        logging.warning("--init_checkpoint=%s (a %s %s model) has no %s for --objective=%s: %s start%s from a "
                        "random init", where, init.cfg.family, init.task, ", ".join(fresh), cfg.objective,
                        "they" if len(fresh) > 1 else "it", "" if len(fresh) > 1 else "s")
    return out


def _placed(src, like, where: str, name: str):
    """Host arrays `src` as arrays shaped and sharded as `like` (errors name the param)."""
    train.check_init_part(src, like, where, name, PretrainError)
    return _placed_as(src, like)


def _placed_as(src, like):
    """Host arrays `src` (shapes checked) as arrays shaped and sharded as `like`."""
    return jax.tree.map(lambda x, t: train.place(np.asarray(x, t.dtype), t.sharding), src, like)


def model_config(o: PretrainOptions, tokenizer: Tokenizer) -> ModelConfig:
    overrides = o.model.overrides()
    base = variant(o.model.base_variant)
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


def prepare_tokenizer(o: PretrainOptions, workdir, local_root: pathlib.Path,
                      init: InitCheckpoint | None = None) -> tuple[Tokenizer, pathlib.Path]:
    return _first_process_then_all("tokenizer", lambda: _prepare_tokenizer(o, workdir, local_root, init))


def _prepare_tokenizer(o: PretrainOptions, workdir, local_root: pathlib.Path,
                       init: InitCheckpoint | None) -> tuple[Tokenizer, pathlib.Path]:
    """The run's tokenizer, copied into <workdir>/tokenizer: --init_checkpoint's, else
    --tokenizer's, else trained from the corpus (WordPiece unless the variant's family
    says otherwise). Returns
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
    if init is not None or o.tokenizer:
        copy_tokenizer_files(init.tok_dir if init is not None else o.tokenizer, local)
        tok = Tokenizer.load(local)
    else:
        from bert_jax.data import vocab
        kind = FAMILY_KIND[variant(o.model.base_variant).family]
        logging.info("no --tokenizer: training a %s vocabulary of %d on --corpus", kind, o.tokenizer_vocab_size)
        tok = vocab.train(kind, o.corpus, o.tokenizer_vocab_size, local, lowercase=o.lowercase)
        if tok.vocab_size * 10 < o.tokenizer_vocab_size:  # a toy vocabulary: the corpus is far too small
            storage.rmtree(local)
            raise PretrainError(f"--corpus={o.corpus} gives a vocabulary of {tok.vocab_size} tokens, under a tenth of "
                                f"--tokenizer_vocab_size={o.tokenizer_vocab_size}: the corpus is too small to train "
                                "a tokenizer on (give more text, a smaller --tokenizer_vocab_size, or --tokenizer)")
    if remote:
        storage.copy_tree(local, dest)
    return tok, local


def make_source(o: PretrainOptions, cfg: ModelConfig, tok: Tokenizer, tok_dir, corpus_glob,
                seed: int, cache_dir: pathlib.Path, flag: str) -> loader.PretrainSource:
    """The rows of the objective's instance kind from `corpus_glob` (given by `flag`): the
    training stream, or (seed 12345) the held-out stream the `heldout` job also reads."""
    c = source.SourceConfig(
        cfg.pretraining_objective.instance_kind, o.max_seq_length, o.batch_size, seed,
        masking.MaskingConfig(o.masked_lm_prob, o.max_predictions_per_seq, o.whole_word_masking, o.max_ngram),
        cfg.position_offset, cfg.type_vocab_size, o.document_boundary, o.sentence_splitter, o.short_seq_prob,
        o.instances == "on_the_fly", o.max_examples_per_row, o.static_masks)
    return source.make(corpus.expand(corpus_glob, flag), tok, tok_dir, cache_dir, c, flag=flag,
                       process_index=jax.process_index(), process_count=jax.process_count(), barrier=_barrier)


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
    check_workdir(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with ckpt_lib.WorkdirLock(workdir, "pretrain"):
        return _run(o, workdir)


# What a workdir holds before a run's record (manifest.json) is written: its lock, what the
# run prepared before it failed (tokenizer, corpus cache, compiled steps), launch.sh
# --slurm's script folder and the sweep's log of the run.
BEFORE_THE_RECORD = frozenset({".lock", "tokenizer", "cache", "compilation_cache", "slurm", "sweep.log"})


def check_workdir(workdir) -> None:
    """A --workdir is empty, new, or one of our pretraining runs: a folder holding other
    files (someone's config.json, flags.txt, metrics.jsonl) is refused before anything is
    written into it, naming them."""
    if not workdir.is_dir():
        return
    record = workdir / "manifest.json"
    if ckpt_lib.has_checkpoint(workdir):
        return
    if record.exists():
        try:
            if "options" in json.loads(record.read_text()):
                return
        except ValueError:
            pass
    foreign = sorted(p.name for p in workdir.iterdir() if p.name not in BEFORE_THE_RECORD)
    if foreign:
        raise PretrainError(f"--workdir={workdir} is not empty and holds no pretraining run of bert_jax (no "
                            f"manifest.json of ours): {', '.join(foreign[:6])}{' ...' if len(foreign) > 6 else ''}; "
                            "use a new or empty --workdir (nothing was written)")


def _run(o: PretrainOptions, workdir: pathlib.Path) -> dict:
    mesh = sharding.make_mesh(o.mesh_data, o.mesh_fsdp, o.mesh_tensor)
    train.check_batch(o.batch_size, o.grad_accum, mesh)  # before any tokenizer or cache is built
    cache_dir = pathlib.Path(o.cache_dir) if o.cache_dir else workdir / "cache"
    # Compiled steps are kept locally: beside the corpus when the workdir is on a store.
    train.use_compilation_cache(o.compilation_cache, cache_dir if storage.is_remote(workdir) else workdir)
    resuming = ckpt_lib.has_checkpoint(workdir)
    if o.phase > 1 and not resuming:
        raise PretrainError(f"--phase={o.phase} continues a run, but --workdir={o.workdir} holds no checkpoint: "
                            f"run phase {o.phase - 1} there first (a phase starts from the one before)")
    if resuming:
        check_same_corpus(o, workdir)
    # A run from a checkpoint loads it once, at its start; resumed, it continues from its own.
    init = load_init(o) if o.init_checkpoint and not resuming else None
    tok, tok_dir = prepare_tokenizer(o, workdir, cache_dir, init)
    if init is not None:
        cfg = init_model_config(o, init.cfg, tok)
    elif o.init_checkpoint:
        cfg = init_model_config(o, ckpt_lib.read_config(workdir), tok)
    else:
        cfg = model_config(o, tok)
    ckpt_lib.check_same_architecture(workdir, cfg)
    objective = cfg.pretraining_objective
    best_metric = o.best_metric or "mlm_accuracy"
    if best_metric not in objective.logged:
        raise PretrainError(f"--best_metric={best_metric!r}: --objective={objective.name} reports {objective.logged}")
    src = make_source(o, cfg, tok, tok_dir, o.corpus, phase_seed(o.seed, o.phase), cache_dir, "--corpus")
    held = (make_source(o, cfg, tok, tok_dir, o.heldout_corpus, 12345, cache_dir, "--heldout_corpus")
            if o.heldout_corpus else None)
    if o.prepare_only:
        logging.info("--prepare_only: tokenizer in %s, corpus prepared in %s", tok_dir, cache_dir)
        return {"prepared": str(cache_dir), "tokenizer": str(tok_dir)}

    # The optimizer state's structure does not depend on the schedule: restore with any.
    abstract, state_sh = train.state_shardings(cfg, optim.make(dataclasses.replace(o.optim, train_steps=o.train_steps)),
                                               o.max_seq_length, mesh)
    batch_sh = lambda ndim: sharding.data_sharding(mesh, ndim)
    ckpt = ckpt_lib.Checkpointer(workdir, o.keep_checkpoints, o.async_checkpoint)
    new_phase, saved_manifest = False, {}
    restored = loop.restore(ckpt, abstract, state_sh)
    if restored is not None:
        start, state, data_state, saved_manifest = restored
        try:
            new_phase = check_resume(o, saved_manifest, tok, ckpt.dir / str(start))
        except PretrainError:
            ckpt.close()
            raise
        logging.info("resuming from %s at step %d%s", ckpt.dir / str(start), start,
                     f", moving to phase {o.phase}" if new_phase else "")
    phases = phase_record(o, saved_manifest, start if restored is not None else 0, new_phase)
    if new_phase:
        if start >= o.train_steps:
            ckpt.close()
            raise PretrainError(f"--phase={o.phase} would start at step {start}, but --train_steps={o.train_steps}: "
                                "nothing left to train (--train_steps counts the steps of every phase)")
        data_state = None  # the new phase reads its own stream from its start
    ocfg = dataclasses.replace(o.optim, train_steps=o.train_steps, schedule_start=(
        phases[-1]["start_step"] if o.phase_schedule == "restart" else 0))
    try:
        tx, lr_fn = optim.make(ocfg), optim.schedule(ocfg)
    except ValueError as e:
        ckpt.close()
        raise PretrainError(str(e)) from None
    if restored is None:
        state, data_state = train.create_state(cfg, tx, o.max_seq_length, o.seed, mesh, state_sh), None
        start = 0
        if init is not None:
            state = train.state_around(merge_init(state.params, init, cfg), tx, o.seed, state_sh, mesh)
    if jax.process_index() == 0:  # the one process that writes files other than checkpoints
        ckpt_lib.write_config(workdir, cfg)
    manifest = dict(flags=o.resolved_flags, options=flag_record(o), git_revision=ckpt_lib.git_revision(),
                    tokenizer_fingerprint=tok.fingerprint(), packages=ckpt_lib.package_versions(),
                    model_config=dataclasses.asdict(cfg), devices=str(jax.devices()[:4]),
                    process_count=jax.process_count(), phase=o.phase, phases=phases, corpus=src.corpus.sources,
                    init_checkpoint=saved_manifest.get("init_checkpoint") if restored is not None else (
                        None if init is None else dict(path=str(init.path), task=init.task, family=init.cfg.family)))
    loop.write_record(workdir, manifest, o.resolved_flags)

    # best/ is chosen within a phase: held-out figures at another length do not compare.
    best = runlog.Best(best_metric, saved_manifest.get("best") if restored is not None and not new_phase else None)

    def save_best(step, params):
        runlog.publish(workdir / "best", params, lambda tmp, host: convert.save_ours(
            tmp, cfg, "pretraining", host, tok_dir, source=f"{workdir} step {step}, best held-out {best_metric}"))

    it = loader.make_iterator(src, data_state)
    example = {k: np.zeros((o.batch_size,) + v.shape, v.dtype) for k, v in src.example(0).items()}
    step_fn = train.make_train_step(cfg, tx, o.grad_accum, state_sh, batch_sh, example, mesh)
    eval_fn = train.make_eval_step(cfg)
    heldout = lambda params: evaluate(eval_fn, params, held, o.eval_batches, batch_sh, objective)
    prefetch = loader.DevicePrefetcher(it, batch_sh, o.batch_size)
    log = runlog.RunLog(workdir, total=o.train_steps, start=start, desc="pretrain", progress_bar=o.progress_bar,
                        max_nonfinite_streak=o.max_nonfinite_streak, lr_fn=lr_fn, figures=objective.figures)
    summary: dict[str, Any] = {}
    if init is not None and held is not None:  # where the continued run starts from, as step 0
        summary["heldout_at_init"] = ev = heldout(state.params)
        log.eval(0, "heldout", ev)
        logging.info("held-out before training (--init_checkpoint=%s): %s", init.path, ev)
    cadence = loop.Cadence(o.train_steps, o.log_every, o.eval_every, o.checkpoint_every, o.stop_at_step)
    out = loop.run(state, start=start, cadence=cadence, batches=prefetch, step_fn=step_fn, log=log, ckpt=ckpt,
                   manifest=manifest, evaluation=loop.Evaluation("heldout", heldout, best, save_best) if held else None,
                   unlogged_transfers=o.unlogged_transfers, mesh=mesh)
    if held:  # also when nothing was left to train: still report
        if out.evaluated is None:
            with jax.set_mesh(mesh):
                out.evaluated = heldout(out.state.params)
        summary["heldout"] = out.evaluated
    loop.check_trained(out, start, ckpt, PretrainError, o.optim, o.optim.learning_rate)
    step = out.step
    summary.update(step=step, workdir=str(workdir), checkpoint=str(ckpt.dir / str(out.last_saved)),
                   metrics=str(log.path), stopped_early=out.stopped,
                   best={best_metric: best.score} if held else None)
    return summary
