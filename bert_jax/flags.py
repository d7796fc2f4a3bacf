"""Every absl flag of every job, and their conversion to typed frozen options.

This is the only module that reads flag values. Each job calls its `define_*_flags()`
before `app.run`, then `*_options(argv)` to get a dataclass; library code never sees
absl. Tests parse flag files with a private FlagValues through the same functions.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import flags

FLAGS = flags.FLAGS


class FlagError(ValueError):
    """A flag value is invalid; the message names the flag."""


def _unparsed(argv) -> None:
    if argv is not None and len(argv) > 1:
        raise FlagError(f"unexpected positional arguments {argv[1:]} (flags need --name=value)")


# ------------------------------------------------------------------------ vocab ----
@dataclasses.dataclass(frozen=True)
class VocabOptions:
    kind: str
    corpus: str
    vocab_size: int
    out: str
    lowercase: bool
    extra_special_tokens: tuple[str, ...]


def define_vocab_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum("kind", "wordpiece", ["wordpiece", "bpe", "sentencepiece"],
                      "Tokenizer scheme: wordpiece (BERT), bpe (RoBERTa), sentencepiece (ALBERT).", flag_values=fv)
    flags.DEFINE_string("corpus", None, "Comma-separated text files or globs.", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 30522, "Vocabulary size, special tokens included.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "Folder to write the tokenizer files to.", flag_values=fv)
    flags.DEFINE_bool("lowercase", True, "Lowercase (and strip accents) before tokenizing.", flag_values=fv)
    flags.DEFINE_list("extra_special_tokens", [], "User-added special tokens.", flag_values=fv)
    flags.mark_flags_as_required(["corpus", "out"], flag_values=fv)


def vocab_options(argv=None, fv: flags.FlagValues = FLAGS) -> VocabOptions:
    _unparsed(argv)
    return VocabOptions(kind=fv.kind, corpus=fv.corpus, vocab_size=fv.vocab_size, out=fv.out,
                        lowercase=fv.lowercase, extra_special_tokens=tuple(fv.extra_special_tokens))


# --------------------------------------------------------------------- pretrain ----
# Model fields that a flag may override (None = the variant's value).
MODEL_OVERRIDES = {
    "vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
    "intermediate_size": int, "embedding_size": int, "num_hidden_groups": int,
    "inner_group_num": int, "max_position_embeddings": int, "hidden_dropout_prob": float,
    "attention_probs_dropout_prob": float, "share_scope": str, "hidden_act": str,
    "dtype": str, "remat_policy": str, "attention_impl": str,
}


def define_model_flags(fv: flags.FlagValues = FLAGS) -> None:
    from bert_jax.config import VARIANTS
    flags.DEFINE_enum("variant", "bert-tiny", sorted(VARIANTS), "Published model size to start from.", flag_values=fv)
    for name, typ in MODEL_OVERRIDES.items():
        define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}[typ]
        define(name, None, f"Override the variant's {name}.", flag_values=fv)
    flags.DEFINE_bool("scan_layers", True, "Run layers with nn.scan (False: a Python loop).", flag_values=fv)
    from bert_jax.config import OBJECTIVES
    flags.DEFINE_enum("objective", None, OBJECTIVES,
                      "Pretraining objective: masked LM alone, or with next-sentence (nsp) or "
                      "sentence-order (sop) prediction. Default: the family's (BERT mlm_nsp, "
                      "RoBERTa mlm, ALBERT mlm_sop).", flag_values=fv)


def model_overrides(fv: flags.FlagValues = FLAGS) -> tuple:
    out = [(k, fv[k].value) for k in (*MODEL_OVERRIDES, "objective") if fv[k].value is not None]
    out.append(("scan_layers", fv.scan_layers))
    return tuple(out)


def define_pretrain_flags(fv: flags.FlagValues = FLAGS, required: bool = True) -> None:
    D = flags
    D.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, tokenizer. Resumes if it holds a checkpoint.", flag_values=fv)
    D.DEFINE_string("corpus", None, "Comma-separated text files or globs to pretrain on.", flag_values=fv)
    D.DEFINE_string("heldout_corpus", None, "Files or globs for held-out MLM/NSP evaluation.", flag_values=fv)
    D.DEFINE_string("tokenizer", None, "Tokenizer folder; if unset, one is trained on --corpus into <workdir>/tokenizer.", flag_values=fv)
    D.DEFINE_integer("tokenizer_vocab_size", 8000, "Vocabulary size when the tokenizer is trained here.", flag_values=fv)
    D.DEFINE_bool("lowercase", True, "Lowercase when training the tokenizer here.", flag_values=fv)
    D.DEFINE_string("cache_dir", None, "Tokenized-corpus cache (default <workdir>/cache).", flag_values=fv)
    D.DEFINE_enum("document_boundary", "file", ["file", "blank_line"], "What separates documents.", flag_values=fv)
    define_model_flags(fv)
    D.DEFINE_integer("max_seq_length", 128, "Tokens per row (at least 8: [CLS] A [SEP] B [SEP] and room for text).",
                     lower_bound=8, flag_values=fv)
    D.DEFINE_integer("max_predictions_per_seq", 20, "Static number of MLM positions per row.", lower_bound=1, flag_values=fv)
    D.DEFINE_float("masked_lm_prob", 0.15, "Fraction of tokens to predict.", lower_bound=0.0, upper_bound=1.0, flag_values=fv)
    D.DEFINE_bool("whole_word_masking", False, "Mask all sub-tokens of a chosen word.", flag_values=fv)
    D.DEFINE_integer("max_ngram", 1, "ALBERT n-gram masking: spans of up to this many words (1 = off).", flag_values=fv)
    D.DEFINE_float("short_seq_prob", 0.1, "Probability of a shorter target length (BERT).", flag_values=fv)
    D.DEFINE_integer("max_examples_per_row", 1, "Pack up to this many instances per row (1 = no packing).", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("batch_size", 32, "Global batch size (all processes, all microbatches).", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("grad_accum", 1, "Microbatches per update.", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("train_steps", 1000, "Optimizer updates.", lower_bound=1, flag_values=fv)
    D.DEFINE_enum("optimizer", "adamw", ["adamw", "adamw_bert", "lamb"], "Optimizer.", flag_values=fv)
    D.DEFINE_float("learning_rate", 1e-4, "Peak learning rate.", flag_values=fv)
    D.DEFINE_integer("warmup_steps", 100, "Linear warmup steps.", flag_values=fv)
    D.DEFINE_float("decay_power", 1.0, "Polynomial decay power (1 = linear); adamw decays after warmup, adamw_bert/lamb from step 0 as the original code.", flag_values=fv)
    D.DEFINE_float("weight_decay", 0.01, "Decoupled weight decay (not on LayerNorm/bias).", flag_values=fv)
    D.DEFINE_float("adam_b1", 0.9, "Adam beta1.", flag_values=fv)
    D.DEFINE_float("adam_b2", 0.999, "Adam beta2.", flag_values=fv)
    D.DEFINE_float("adam_eps", 1e-6, "Adam epsilon.", flag_values=fv)
    D.DEFINE_float("max_grad_norm", 1.0, "Global-norm clipping (0 = off).", flag_values=fv)
    D.DEFINE_integer("seed", 0, "Seed of init, data order, masking and dropout.", flag_values=fv)
    D.DEFINE_integer("mesh_data", -1, "Data-parallel mesh axis size (-1 = the rest).", flag_values=fv)
    D.DEFINE_integer("mesh_fsdp", 1, "FSDP mesh axis size.", flag_values=fv)
    D.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel mesh axis size.", flag_values=fv)
    D.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.", lower_bound=1, flag_values=fv)
    D.DEFINE_bool("async_checkpoint", True, "Save checkpoints in the background.", flag_values=fv)
    D.DEFINE_integer("log_every", 50, "Steps between metrics.jsonl lines.", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("eval_every", 500, "Steps between held-out evaluations.", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("eval_batches", 10, "Held-out batches per evaluation.", lower_bound=1, flag_values=fv)
    D.DEFINE_integer("max_nonfinite_streak", 10, "Stop after this many non-finite steps in a row.", flag_values=fv)
    D.DEFINE_bool("progress_bar", True, "Show a progress bar.", flag_values=fv)
    D.DEFINE_integer("stop_at_step", None, "Checkpoint and exit at this step, keeping the schedule of --train_steps.", flag_values=fv)
    define_unlogged_transfers_flag(fv)
    define_determinism_flag(fv)
    define_distributed_flags(fv)
    if required:
        flags.mark_flags_as_required(["workdir", "corpus"], flag_values=fv)


def define_unlogged_transfers_flag(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum("unlogged_transfers", "allow", ["allow", "log", "disallow"],
                      "JAX's device-to-host transfer guard on steps that log, evaluate and save "
                      "nothing: `log` or `disallow` find a stray copy that stalls the step pipeline.",
                      flag_values=fv)


def define_determinism_flag(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_bool("deterministic_gpu", False,
                      "GPU only: forbid XLA's nondeterministic kernels (scatter-add of embedding "
                      "gradients, some reductions use atomics), so that a GPU run repeats bit for "
                      "bit, at some speed cost. CPU and TPU runs repeat without it.", flag_values=fv)


def apply_determinism(fv: flags.FlagValues = FLAGS) -> None:
    """Set XLA's deterministic-ops flag before JAX starts its back end."""
    import os
    if fv.deterministic_gpu:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()


def define_distributed_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).", flag_values=fv)


def init_distributed(fv: flags.FlagValues = FLAGS) -> None:
    """jax.distributed.initialize from flags, or auto-detected (SLURM, TPU VM) when the
    environment says so; nothing for a single local process."""
    import os
    import jax
    if fv.coordinator_address or fv.num_processes:
        if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # CPU processes talk through gloo
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
    elif "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        jax.distributed.initialize()


def quiet_library_logs(fv: flags.FlagValues = FLAGS) -> None:
    """Libraries (orbax logs every checkpoint step at INFO through absl) keep their
    warnings only, unless --verbosity is 1 or more; bert_jax's own INFO lines stay."""
    import logging as std_logging
    if fv.is_parsed() and fv["verbosity"].value >= 1:
        return

    class _QuietLibraries(std_logging.Filter):
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or "/bert_jax/" in record.pathname
    for h in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        h.addFilter(_QuietLibraries())


def run_job(main, define) -> None:
    """Define a job's flags, make `--help` list them (absl lists the main module's key
    flags, and ours are defined here), quiet library logs, run `main(argv)`."""
    from absl import app
    define()
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def _main(argv):
        quiet_library_logs()
        return main(argv)
    app.run(_main)


def resolved(fv: flags.FlagValues = FLAGS) -> str:
    """Every flag with its final value, as a flag file."""
    return fv.flags_into_string()


def optim_config(fv: flags.FlagValues = FLAGS):
    from bert_jax.optim import OptimConfig
    return OptimConfig(optimizer=fv.optimizer, learning_rate=fv.learning_rate,
                       warmup_steps=fv.warmup_steps, train_steps=fv.train_steps,
                       decay_power=fv.decay_power, weight_decay=fv.weight_decay, b1=fv.adam_b1,
                       b2=fv.adam_b2, eps=fv.adam_eps, max_grad_norm=fv.max_grad_norm)


def pretrain_options(argv=None, fv: flags.FlagValues = FLAGS):
    from bert_jax.pretraining import PretrainOptions
    _unparsed(argv)
    names = ("workdir", "corpus", "heldout_corpus", "tokenizer", "tokenizer_vocab_size", "lowercase",
             "cache_dir", "document_boundary", "variant", "max_seq_length",
             "max_predictions_per_seq", "masked_lm_prob", "whole_word_masking", "max_ngram",
             "short_seq_prob", "max_examples_per_row", "batch_size", "grad_accum", "train_steps",
             "seed", "mesh_data", "mesh_fsdp", "mesh_tensor", "checkpoint_every",
             "keep_checkpoints", "async_checkpoint", "log_every", "eval_every", "eval_batches",
             "max_nonfinite_streak", "progress_bar", "stop_at_step", "unlogged_transfers")
    try:
        return PretrainOptions(**{n: fv[n].value for n in names}, model_overrides=model_overrides(fv),
                               optim=optim_config(fv), resolved_flags=resolved(fv))
    except ValueError as e:
        raise FlagError(str(e)) from None


# ------------------------------------------------------------------------ bench ----
def define_bench_flags(fv: flags.FlagValues = FLAGS) -> None:
    define_pretrain_flags(fv, required=False)
    flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.", lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.", lower_bound=0, flag_values=fv)
    flags.DEFINE_list("seq_len", [], "Sequence lengths to time (default: --max_seq_length).", flag_values=fv)
    flags.DEFINE_float("peak_tflops", None, "Device peak for MFU (default: known GPUs' bf16 dense peak).", flag_values=fv)


# ---------------------------------------------------------------------- convert ----
@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    from_hf: str | None
    out: str | None
    checkpoint: str | None
    to_hf: str | None
    hf_dtype: str


def define_convert_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("from_hf", None, "Hugging Face folder to import.", flag_values=fv)
    flags.DEFINE_string("out", None, "Our checkpoint folder to write (with --from_hf).", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, "Our checkpoint folder to export.", flag_values=fv)
    flags.DEFINE_string("to_hf", None, "Hugging Face folder to write (with --checkpoint).", flag_values=fv)
    flags.DEFINE_enum("hf_dtype", "float32", ["float32", "bfloat16"], "Exported tensor dtype.", flag_values=fv)


def convert_options(argv=None, fv: flags.FlagValues = FLAGS) -> ConvertOptions:
    _unparsed(argv)
    o = ConvertOptions(fv.from_hf, fv.out, fv.checkpoint, fv.to_hf, fv.hf_dtype)
    if bool(o.from_hf) == bool(o.checkpoint):
        raise FlagError("give either --from_hf=DIR --out=DIR or --checkpoint=DIR --to_hf=DIR")
    if o.from_hf and not o.out:
        raise FlagError("--from_hf needs --out")
    if o.checkpoint and not o.to_hf:
        raise FlagError("--checkpoint needs --to_hf")
    return o


# ----------------------------------------------------------------- side_by_side ----
@dataclasses.dataclass(frozen=True)
class SideBySideOptions:
    out: str
    init_checkpoint: str | None
    parallel: int
    deadline_s: float | None
    collect: bool
    runs: tuple[str, ...]       # NAME[:SEEDS] of experiments/finetune/NAME.flags
    extra: tuple[str, ...]      # --flag=value given to every run


def define_side_by_side_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("init_checkpoint", None, "Hugging Face model folder (both sides).", flag_values=fv)
    flags.DEFINE_string("out", None, "Output folder.", flag_values=fv)
    flags.DEFINE_integer("parallel", 1, "Runs at a time.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float("deadline_s", None, "Start nothing after this many seconds; stop what still runs.",
                       flag_values=fv)
    flags.DEFINE_bool("collect", False, "Run nothing: tabulate the finished runs already under --out.",
                      flag_values=fv)
    flags.mark_flags_as_required(["out"], flag_values=fv)


def side_by_side_options(argv, fv: flags.FlagValues = FLAGS) -> SideBySideOptions:
    """argv after absl: positional NAME[:SEEDS] runs, then (after `--`) --flag=value
    flags for every run."""
    rest = list(argv[1:])
    runs = tuple(a for a in rest if not a.startswith("-"))
    extra = tuple(a for a in rest if a.startswith("-"))
    if fv.collect and runs:
        raise FlagError(f"--collect runs nothing; drop the runs {list(runs)}")
    if not fv.collect and not (runs and fv.init_checkpoint):
        raise FlagError("give --init_checkpoint=HF_DIR and at least one run (e.g. sst2 mrpc:0,1,2), or --collect")
    return SideBySideOptions(fv.out, fv.init_checkpoint, fv.parallel, fv.deadline_s, fv.collect, runs, extra)


# ----------------------------------------------------------------------- encode ----
@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    checkpoint: str
    input: str
    output: str
    max_length: int
    batch_size: int


def define_encode_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("checkpoint", None, "Checkpoint folder (ours or Hugging Face).", flag_values=fv)
    flags.DEFINE_string("input", None, ".txt (text or text<TAB>text per line) or .jsonl (text, text_pair).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output .npz file.", flag_values=fv)
    flags.DEFINE_integer("max_length", 512, "Truncate inputs to this many tokens.", lower_bound=3, flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Texts per forward pass.", lower_bound=1, flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "input", "output"], flag_values=fv)


def encode_options(argv=None, fv: flags.FlagValues = FLAGS) -> EncodeOptions:
    _unparsed(argv)
    return EncodeOptions(fv.checkpoint, fv.input, fv.output, fv.max_length, fv.batch_size)


# --------------------------------------------------------------------- finetune ----
def define_finetune_flags(fv: flags.FlagValues = FLAGS) -> None:
    D = flags
    D.DEFINE_enum("task", None, ["classification", "regression", "ner", "qa"], "Task type.", flag_values=fv)
    D.DEFINE_string("init_checkpoint", None, "Our checkpoint folder or a Hugging Face folder.", flag_values=fv)
    D.DEFINE_string("train_file", None, "Training file (TSV/CSV/JSONL, CoNLL, or SQuAD JSON).", flag_values=fv)
    D.DEFINE_list("eval_files", [], "NAME=PATH,... of labeled files to evaluate on.", flag_values=fv)
    D.DEFINE_string("select_on", None, "The --eval_files NAME whose --best_metric chooses the best "
                    "checkpoint (a dev set, never the test set); default the first, with a warning.", flag_values=fv)
    D.DEFINE_string("workdir", None, "Output folder.", flag_values=fv)
    D.DEFINE_integer("seed", 0, "Seed of the head init, data order, dropout and subsampling.", flag_values=fv)
    D.DEFINE_string("text_column", "sentence", "Text column.", flag_values=fv)
    D.DEFINE_string("pair_column", None, "Second text column (sentence pairs).", flag_values=fv)
    D.DEFINE_string("label_column", "label", "Label column.", flag_values=fv)
    D.DEFINE_bool("header", True, "TSV/CSV files start with a header row naming the columns; with "
                  "--noheader give the columns as numbers from 0 (e.g. --text_column=1).", flag_values=fv)
    D.DEFINE_string("encoding", "utf-8", "Text encoding of every input file (e.g. latin-1).", flag_values=fv)
    D.DEFINE_list("labels", [], "Label set in order (default: sorted labels of the train file).", flag_values=fv)
    D.DEFINE_enum("tag_scheme", "IOB2", ["IOB1", "IOB2", "BIOES"], "Tag scheme of the CoNLL files.", flag_values=fv)
    D.DEFINE_enum("output_scheme", "BIOES", ["IOB1", "IOB2", "BIOES"], "Scheme the tagger learns and decodes.", flag_values=fv)
    D.DEFINE_integer("max_seq_length", 128, "Tokens per row.", lower_bound=8, flag_values=fv)
    D.DEFINE_integer("doc_stride", 128, "QA: tokens between window starts.", flag_values=fv)
    D.DEFINE_integer("max_query_length", 64, "QA: question tokens kept.", flag_values=fv)
    D.DEFINE_integer("max_answer_length", 30, "QA: longest answer in tokens.", flag_values=fv)
    D.DEFINE_integer("n_best", 20, "QA: start/end candidates searched.", flag_values=fv)
    D.DEFINE_float("null_threshold", None, "SQuAD v2.0: predict no answer when null beats best span by this.", flag_values=fv)
    D.DEFINE_integer("batch_size", 32, "Batch size.", lower_bound=1, flag_values=fv)
    D.DEFINE_float("learning_rate", 2e-5, "Peak learning rate.", flag_values=fv)
    D.DEFINE_float("epochs", 3.0, "Training epochs.", flag_values=fv)
    D.DEFINE_float("warmup_proportion", 0.1, "Fraction of steps of linear warmup.", flag_values=fv)
    D.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.", flag_values=fv)
    D.DEFINE_integer("eval_every", 0, "Steps between evaluations (0: at the end).", flag_values=fv)
    D.DEFINE_string("best_metric", None, "Metric that selects the best checkpoint.", flag_values=fv)
    D.DEFINE_integer("max_train_examples", None, "Seeded subsample of the training set.", flag_values=fv)
    D.DEFINE_float("dropout", None, "Override the checkpoint's dropout.", flag_values=fv)
    D.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.", flag_values=fv)
    D.DEFINE_bool("progress_bar", True, "Show a progress bar.", flag_values=fv)
    D.DEFINE_integer("mesh_data", -1, "Data-parallel mesh axis size (-1 = the rest).", flag_values=fv)
    D.DEFINE_integer("mesh_fsdp", 1, "FSDP mesh axis size.", flag_values=fv)
    D.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel mesh axis size.", flag_values=fv)
    D.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints (0: only at the end); a rerun "
                     "on the same --workdir resumes from the last one.", lower_bound=0, flag_values=fv)
    D.DEFINE_integer("keep_checkpoints", 2, "Checkpoints kept.", lower_bound=1, flag_values=fv)
    D.DEFINE_bool("async_checkpoint", True, "Save checkpoints in the background.", flag_values=fv)
    D.DEFINE_integer("stop_at_step", None, "Checkpoint and exit at this step, keeping the schedule.", flag_values=fv)
    define_unlogged_transfers_flag(fv)
    define_determinism_flag(fv)
    define_distributed_flags(fv)
    flags.mark_flags_as_required(["task", "init_checkpoint", "train_file", "workdir"], flag_values=fv)


def finetune_options(argv=None, fv: flags.FlagValues = FLAGS):
    from bert_jax.finetuning import FinetuneOptions
    _unparsed(argv)
    evals = []
    for item in fv.eval_files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise FlagError(f"--eval_files: {item!r} is not NAME=PATH")
        evals.append((name, path))
    names = ("task", "init_checkpoint", "train_file", "workdir", "seed", "text_column", "pair_column",
             "label_column", "tag_scheme", "output_scheme", "max_seq_length", "doc_stride",
             "max_query_length", "max_answer_length", "n_best", "null_threshold", "batch_size",
             "learning_rate", "epochs", "warmup_proportion", "weight_decay", "eval_every",
             "best_metric", "max_train_examples", "dropout", "dtype", "select_on", "header",
             "encoding", "progress_bar", "mesh_data", "mesh_fsdp", "mesh_tensor", "checkpoint_every",
             "keep_checkpoints", "async_checkpoint", "stop_at_step", "unlogged_transfers")
    return FinetuneOptions(eval_files=tuple(evals), labels=tuple(fv.labels),
                           **{n: fv[n].value for n in names})


# ---------------------------------------------------------------------- predict ----
def define_predict_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("checkpoint", None, "The best/ folder of a finetune run.", flag_values=fv)
    flags.DEFINE_string("input", None, "Unlabeled input: TSV/CSV/JSONL rows (classification, regression), "
                        "one word per line (ner), SQuAD JSON (qa).", flag_values=fv)
    flags.DEFINE_string("output", None, "File to write: TSV (classification, regression), CoNLL (ner), "
                        "{id: answer} JSON (qa).", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "Rows per forward pass.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("text_column", None, "Text column of --input (default: the run's).", flag_values=fv)
    flags.DEFINE_string("pair_column", None, "Second text column of --input (default: the run's).", flag_values=fv)
    flags.DEFINE_bool("header", None, "Whether --input has a header row (default: as the run's files).", flag_values=fv)
    flags.DEFINE_string("encoding", None, "Text encoding of --input (default: the run's).", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "input", "output"], flag_values=fv)


def predict_options(argv=None, fv: flags.FlagValues = FLAGS):
    from bert_jax.predict import PredictOptions
    _unparsed(argv)
    return PredictOptions(fv.checkpoint, fv.input, fv.output, fv.batch_size, fv.text_column,
                          fv.pair_column, fv.header, fv.encoding)
