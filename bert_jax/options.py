"""Every job's options, written once: frozen dataclasses whose fields carry the help text,
choices and bounds of their command-line flag. The field's default is the option's one
default.

flags.py generates the absl flags from these fields (a field whose type is another
options dataclass contributes that class's flags) and reads the parsed values back into
the dataclass; flag files stay the experiment record. Library code takes these dataclasses
and never imports the flag layer. This module imports nothing else of bert_jax.

Field metadata (see `option`): help, choices, lower/upper bounds, `flag` (the flag's
name when it differs from the field's; None: not a flag, set by the job), `parse` (how a
list flag's items become the field's value) and `resume`: whether the option may differ
when a run resumes on its workdir (`resume_rules`): SAME (the default: a difference is
another run, refused by name), MAY_CHANGE (how a run is observed, checkpointed, stopped
or laid out on devices, not what it computes) or PHASE (pretraining: may change when the
run moves to a new --phase, e.g. BERT's sequence length 128 -> 512). `REQUIRED` names the
flags a job cannot run without.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

NOT_A_FLAG = None
# How an option may differ when a run resumes (the `resume` metadata of `option`).
SAME, MAY_CHANGE, PHASE = "same", "may_change", "phase"


def option(default: Any, help: str, *, choices=None, lower=None, upper=None, flag: str | None = "",
           parse: Callable | None = None, resume: str = SAME):
    """A dataclass field that is also a flag (named `flag`, default: the field's name; None:
    no flag). `resume`: SAME, MAY_CHANGE or PHASE (see the module docstring)."""
    return dataclasses.field(default=default, metadata=dict(
        help=help, choices=tuple(choices) if choices else None, lower=lower, upper=upper, flag=flag,
        parse=parse, resume=resume))


def internal(default: Any, why: str):
    """A field the job sets, not a flag."""
    return dataclasses.field(default=default, metadata=dict(help=why, flag=NOT_A_FLAG))


def _name_eq_path(items) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--eval_files: {item!r} is not NAME=PATH")
        out.append((name, path))
    return tuple(out)


def _some_masked(p: float) -> None:
    if not p > 0:  # a flag bound is inclusive: 0 passes it, and then nothing is ever predicted
        raise ValueError(f"--masked_lm_prob={p}: must be above 0 (it is the fraction of tokens the MLM predicts)")


# --------------------------------------------------------------------- shared ----
# The environment variable naming one compilation cache for every job that leaves
# --compilation_cache unset (the test suite and sweeps set it).
COMPILATION_CACHE_ENV = "BERT_JAX_COMPILATION_CACHE"
COMPILATION_CACHE_HELP = (
    "Persistent XLA compilation cache: a rerun loads its compiled steps instead of compiling them again. A folder "
    "(it may be shared by the runs and jobs you trust: it holds executable code; $BERT_JAX_COMPILATION_CACHE names "
    "one for every job that leaves this flag unset), or 'off'. ")


def _model_job_cache():
    """The compilation_cache option of the jobs that run a model without training it."""
    return option("", COMPILATION_CACHE_HELP + "'' = $BERT_JAX_COMPILATION_CACHE if set, else none.")


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    coordinator_address: str | None = option(None, "host:port of process 0 (multi-host).", resume=MAY_CHANGE)
    num_processes: int | None = option(None, "Number of processes (multi-host).", resume=MAY_CHANGE)
    process_id: int | None = option(None, "This process's index (multi-host).", resume=MAY_CHANGE)
    heartbeat_timeout: int = option(
        30, "Multi-process: seconds without a heartbeat after which the other processes count a "
        "process as lost and exit with an error (a dead peer would otherwise hang collectives).", lower=5,
        resume=MAY_CHANGE)
    deterministic_gpu: bool = option(
        False, "GPU only: forbid XLA's nondeterministic kernels (scatter-add of embedding "
        "gradients, some reductions use atomics), so that a GPU run repeats bit for bit, at some "
        "speed cost. CPU and TPU runs repeat without it.", resume=MAY_CHANGE)


@dataclasses.dataclass(frozen=True)
class MeshOptions:
    mesh_data: int = option(-1, "Data-parallel mesh axis size (-1 = the rest).", resume=MAY_CHANGE)
    mesh_fsdp: int = option(1, "FSDP mesh axis size.", lower=1, resume=MAY_CHANGE)
    mesh_tensor: int = option(1, "Tensor-parallel mesh axis size.", lower=1, resume=MAY_CHANGE)


UNLOGGED_TRANSFERS_HELP = ("JAX's device-to-host transfer guard on steps that log, evaluate and save "
                           "nothing: `log` or `disallow` find a stray copy that stalls the step pipeline.")


@dataclasses.dataclass(frozen=True)
class RunOptions(MeshOptions, DistributedOptions):
    """What both training loops share: the mesh, processes, stopping, observing."""
    async_checkpoint: bool = option(True, "Save checkpoints in the background.", resume=MAY_CHANGE)
    progress_bar: bool = option(True, "Show a progress bar.", resume=MAY_CHANGE)
    log_every: int = option(50, "Steps between training lines in metrics.jsonl (means over those steps).", lower=1,
                            resume=MAY_CHANGE)
    max_nonfinite_streak: int = option(10, "Stop after this many non-finite steps in a row (their "
                                       "updates are skipped).", lower=1, resume=MAY_CHANGE)
    best_metric: str | None = option(
        None, "Evaluation metric that chooses <workdir>/best/ (metrics named *loss* lower is better). "
        "Default: fine-tuning, the task's; pretraining, held-out mlm_accuracy.")
    stop_at_step: int | None = option(None, "Checkpoint and exit at this step, keeping the schedule.",
                                      resume=MAY_CHANGE)
    compilation_cache: str = option(
        "", COMPILATION_CACHE_HELP + "'' = $BERT_JAX_COMPILATION_CACHE if set, else <workdir>/compilation_cache "
        "(a URI workdir: pretraining's <cache_dir>/compilation_cache, fine-tuning's none).", resume=MAY_CHANGE)
    unlogged_transfers: str = option("allow", UNLOGGED_TRANSFERS_HELP, choices=("allow", "log", "disallow"),
                                     resume=MAY_CHANGE)
    resolved_flags: str = internal("", "every flag with its final value, as a flag file (the run record)")


# ---------------------------------------------------------------------- model ----
FAMILIES = ("bert", "roberta", "albert")
OBJECTIVES = ("mlm", "mlm_nsp", "mlm_sop")
DEFAULT_VARIANT = "bert-tiny"


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """A published size (`variant`) and overrides of its fields (None: the variant's)."""
    variant: str | None = option(
        None, f"Published model size to start from (config.VARIANTS). Default: {DEFAULT_VARIANT} from scratch; "
        "with --init_checkpoint, the checkpoint's (a variant given must match it).")
    objective: str | None = option(
        None, "Pretraining objective: masked LM alone, or with next-sentence (nsp) or sentence-order "
        "(sop) prediction. Default: the family's (BERT mlm_nsp, RoBERTa mlm, ALBERT mlm_sop).",
        choices=OBJECTIVES)
    vocab_size: int | None = option(None, "Override the variant's vocab_size.")
    hidden_size: int | None = option(None, "Override the variant's hidden_size.")
    num_hidden_layers: int | None = option(None, "Override the variant's num_hidden_layers.")
    num_attention_heads: int | None = option(None, "Override the variant's num_attention_heads.")
    intermediate_size: int | None = option(None, "Override the variant's intermediate_size.")
    embedding_size: int | None = option(None, "Factorized embedding width E (ALBERT §3.1), any family.")
    num_hidden_groups: int | None = option(None, "Cross-layer sharing: groups of distinct layers (ALBERT).")
    inner_group_num: int | None = option(None, "Cross-layer sharing: distinct layers per group.")
    max_position_embeddings: int | None = option(None, "Override the variant's max_position_embeddings.")
    hidden_dropout_prob: float | None = option(None, "Override the variant's hidden_dropout_prob.")
    attention_probs_dropout_prob: float | None = option(None, "Override the variant's attention_probs_dropout_prob.")
    share_scope: str | None = option(None, "Which sub-blocks the sharing groups share.",
                                     choices=("all", "attention", "ffn", "none"))
    hidden_act: str | None = option(None, "Override the variant's hidden_act.", choices=("gelu", "gelu_new", "relu"))
    dtype: str | None = option(None, "Compute dtype (params stay float32).", choices=("float32", "bfloat16"))
    remat_policy: str | None = option(None, "Rematerialization of the layer body.",
                                      choices=("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable"),
                                      resume=MAY_CHANGE)
    attention_impl: str | None = option(None, "Attention kernel.", choices=("auto", "xla", "cudnn"),
                                        resume=MAY_CHANGE)
    scan_layers: bool = option(True, "Run layers with nn.scan (False: a Python loop).", resume=MAY_CHANGE)

    @property
    def base_variant(self) -> str:
        """The variant a model trained from scratch starts from."""
        return self.variant or DEFAULT_VARIANT

    def overrides(self) -> dict[str, Any]:
        """The ModelConfig fields to change from the variant's."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("variant", "scan_layers") and getattr(self, f.name) is not None}
        out["scan_layers"] = self.scan_layers
        return out


# ------------------------------------------------------------------ optimizer ----
OPTIMIZERS = ("adamw", "adamw_bert", "lamb")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """The optimizer and its constants: options of both loops (pretraining in OptimConfig,
    fine-tuning among its own options), each giving its own rate and schedule length."""
    optimizer: str = option("adamw", "Optimizer.", choices=OPTIMIZERS)
    decay_power: float = option(1.0, "Polynomial decay power (1 = linear); adamw decays after warmup, "
                                "adamw_bert/lamb from step 0 as the original code.", resume=PHASE)
    weight_decay: float = option(0.01, "Decoupled weight decay (not on LayerNorm/bias).")
    b1: float = option(0.9, "Adam beta1.", flag="adam_b1")
    b2: float = option(0.999, "Adam beta2.", flag="adam_b2")
    eps: float = option(1e-6, "Adam epsilon.", flag="adam_eps")
    max_grad_norm: float = option(1.0, "Global-norm clipping (0 = off).")


@dataclasses.dataclass(frozen=True)
class OptimConfig(OptimizerOptions):
    learning_rate: float = option(1e-4, "Peak learning rate (0: a frozen run, a useful probe).", lower=0.0,
                                  resume=PHASE)
    warmup_steps: int = option(100, "Linear warmup steps.", lower=0, resume=PHASE)
    train_steps: int = internal(1000, "the job's step count")
    schedule_start: int = internal(0, "the step the schedule's warmup starts at (a phase with its own schedule)")

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer={self.optimizer!r}: must be one of {OPTIMIZERS}")
        if self.warmup_steps > self.train_steps - self.schedule_start:
            raise ValueError(f"--warmup_steps={self.warmup_steps} exceeds the {self.train_steps - self.schedule_start} "
                             f"steps of the schedule (--train_steps={self.train_steps}"
                             + (f", from step {self.schedule_start})" if self.schedule_start else ")"))


# ---------------------------------------------------------------------- vocab ----
@dataclasses.dataclass(frozen=True)
class VocabOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("corpus", "out")
    kind: str = option("wordpiece", "Tokenizer scheme: wordpiece (BERT), bpe (RoBERTa), sentencepiece (ALBERT).",
                       choices=("wordpiece", "bpe", "sentencepiece"))
    corpus: str | None = option(None, "Comma-separated text files or globs.")
    vocab_size: int = option(30522, "Vocabulary size, special tokens included.", lower=1)
    out: str | None = option(None, "Folder to write the tokenizer files to.")
    lowercase: bool = option(True, "Lowercase (and strip accents) before tokenizing.")
    extra_special_tokens: tuple[str, ...] = option((), "User-added special tokens.")


# ------------------------------------------------------------------- pretrain ----
@dataclasses.dataclass(frozen=True)
class PretrainOptions(RunOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ("workdir", "corpus")
    workdir: str | None = option(None, "Run folder: checkpoints, metrics, tokenizer. Resumes if it holds a checkpoint. "
                                     "A local folder or an object-store URI (gs://bucket/run; needs --cache_dir).",
                                     resume=MAY_CHANGE)
    corpus: str | None = option(None, "Comma-separated text files or globs to pretrain on.", resume=PHASE)
    heldout_corpus: str | None = option(None, "Files or globs for held-out MLM/NSP evaluation.", resume=MAY_CHANGE)
    init_checkpoint: str | None = option(
        None, "Start from this model instead of a random init: our checkpoint folder (a pretraining workdir, its "
        "best/, a converted folder) or a Hugging Face BERT/RoBERTa/ALBERT folder, with or without pretraining heads. "
        "Its weights, heads, tokenizer and model options are used (heads it lacks start fresh, with a warning); the "
        "optimizer starts fresh at step 0. A resumed run continues from its own checkpoints.")
    phase: int = option(
        1, "The run's phase (BERT: 1 at length 128, then 2 at 512 on the same --workdir). A run moves to the next "
        "phase when its workdir's checkpoint is of the one before: weights, optimizer state and step carry over, and "
        "the options marked as phase options (sequence length, MLM positions, batch, corpus, schedule shape) may "
        "change; every other option must stay.", lower=1)
    phase_schedule: str = option(
        "continue", "The learning rate of a phase after the first: continue (the one schedule over all "
        "--train_steps, as google-research/bert's phase 2) or restart (the phase's own --warmup_steps and "
        "--learning_rate from its first step, decaying to --train_steps, as NVIDIA's LAMB recipe).",
        choices=("continue", "restart"), resume=PHASE)
    tokenizer: str | None = option(None, "Tokenizer folder; if unset, one is trained on --corpus into <workdir>/tokenizer "
                                   "(with --init_checkpoint: the checkpoint's; one given must be the same).")
    tokenizer_vocab_size: int = option(8000, "Vocabulary size when the tokenizer is trained here.", lower=1)
    lowercase: bool = option(True, "Lowercase when training the tokenizer here.")
    cache_dir: str | None = option(None, "Tokenized-corpus cache, a local folder (memory-mapped; default "
                                       "<workdir>/cache, required when --workdir is a URI).", resume=MAY_CHANGE)
    document_boundary: str = option("file", "What separates documents.", choices=("file", "blank_line"),
                                    resume=PHASE)
    sentence_splitter: str = option(
        "pysbd", "Sentence splitter of corpus preparation: pysbd (rule-based, about 0.1 MB/s per core) or "
        "blingfire (60-190x faster, keeps 85-99% of pysbd's boundaries and adds some).",
        choices=("pysbd", "blingfire"))
    model: ModelOptions = dataclasses.field(default=ModelOptions())
    max_seq_length: int = option(128, "Tokens per row (at least 8: [CLS] A [SEP] B [SEP] and room for text).", lower=8,
                                 resume=PHASE)
    max_predictions_per_seq: int = option(20, "Static number of MLM positions per row.", lower=1, resume=PHASE)
    masked_lm_prob: float = option(0.15, "Fraction of tokens to predict, in (0, 1].", lower=0.0, upper=1.0)
    whole_word_masking: bool = option(False, "Mask all sub-tokens of a chosen word.")
    max_ngram: int = option(1, "ALBERT n-gram masking: spans of up to this many words (1 = off).", lower=1)
    static_masks: int = option(
        0, "0 = dynamic masking (new masks every time a row is read, RoBERTa); K >= 1 = static: each "
        "instance has K fixed masks, used in turn epoch by epoch (BERT's data pipeline with dupe_factor=K; "
        "RoBERTa Table 1 compares K=10 with dynamic). Needs --instances=prebuilt.", lower=0)
    short_seq_prob: float = option(0.1, "Probability of a shorter target length (BERT).", lower=0.0, upper=1.0)
    max_examples_per_row: int = option(1, "Pack up to this many instances per row (1 = no packing; "
                                       "needs --instances=prebuilt).", lower=1)
    instances: str = option(
        "on_the_fly", "How NSP/SOP pairs and FULL-SENTENCES rows are made: on_the_fly (a pure function of "
        "seed, epoch and position, paired anew every epoch; memory does not grow with the corpus) or "
        "prebuilt (BERT's create_pretraining_data walk, once per run; needed for packing).",
        choices=("on_the_fly", "prebuilt"))
    prepare_only: bool = option(False, "Prepare the tokenizer and the tokenized corpus (every process its "
                                "share of the files), then exit: the first step of a large run.", resume=MAY_CHANGE)
    batch_size: int = option(32, "Global batch size (all processes, all microbatches).", lower=1, resume=PHASE)
    grad_accum: int = option(1, "Microbatches per update.", lower=1, resume=PHASE)
    train_steps: int = option(1000, "Optimizer updates.", lower=1, resume=MAY_CHANGE)
    optim: OptimConfig = dataclasses.field(default=OptimConfig())
    seed: int = option(0, "Seed of init, data order, masking and dropout.")
    checkpoint_every: int = option(500, "Steps between checkpoints.", lower=1, resume=MAY_CHANGE)
    keep_checkpoints: int = option(3, "Checkpoints kept.", lower=1, resume=MAY_CHANGE)
    eval_every: int = option(500, "Steps between held-out evaluations.", lower=1, resume=MAY_CHANGE)
    eval_batches: int = option(10, "Held-out batches per evaluation.", lower=1, resume=MAY_CHANGE)

    def __post_init__(self):
        _some_masked(self.masked_lm_prob)
        if self.static_masks and self.instances != "prebuilt":
            raise ValueError(f"--static_masks={self.static_masks} fixes the masks of each instance, but "
                             f"--instances={self.instances} pairs the text anew every epoch: use --instances=prebuilt")
        if self.max_examples_per_row > 1 and self.instances != "prebuilt":
            raise ValueError(f"--max_examples_per_row={self.max_examples_per_row} packs instances whose lengths "
                             f"are known ahead: it needs --instances=prebuilt (not {self.instances})")


@dataclasses.dataclass(frozen=True)
class BenchOptions(PretrainOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ()
    steps: int = option(10, "Timed steps after warm-up.", lower=1)
    warmup: int = option(2, "Untimed steps after compilation.", lower=0)
    seq_len: tuple[str, ...] = option((), "Sequence lengths to time (default: --max_seq_length).")
    peak_tflops: float | None = option(None, "Device peak for MFU (default: known GPUs' bf16 dense peak).")
    input_pipeline: bool = option(
        False, "Time the input pipeline alone instead of the step: rows of --corpus (tokenized with "
        "--tokenizer, masked, packed as the flags say) made on this one thread, as grain's workers make them.")
    rows: int = option(4000, "--input_pipeline: rows timed.", lower=1)
    peer: str = option("none", "Also time a peer on each shape, in the same process right after ours: hf = "
                       "Hugging Face transformers, PyTorch eager, the class with the same heads (needs the "
                       "test extra).", choices=("none", "hf"))


# ------------------------------------------------------------------- finetune ----
FINETUNE_TASKS = ("classification", "regression", "ner", "qa")
SCHEMES = ("IOB1", "IOB2", "BIOES")


@dataclasses.dataclass(frozen=True)
class FinetuneOptions(RunOptions, OptimizerOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ("task", "init_checkpoint", "train_file", "workdir")
    task: str | None = option(None, "Task type.", choices=FINETUNE_TASKS)
    init_checkpoint: str | None = option(None, "Our checkpoint folder or a Hugging Face folder.")
    from_scratch: bool = option(False, "Take only the architecture and tokenizer of --init_checkpoint; "
                                "the backbone starts from a seeded random init (the no-pretraining baseline).")
    train_file: str | None = option(None, "Training file (TSV/CSV/JSONL, CoNLL, or SQuAD JSON).")
    workdir: str | None = option(None, "Output folder; a rerun of the same run resumes there. A local "
                                     "folder or an object-store URI (gs://bucket/run).", resume=MAY_CHANGE)
    eval_files: tuple[tuple[str, str], ...] = option(
        (), "NAME=PATH,... of labeled files to evaluate on.", parse=_name_eq_path)
    select_on: str | None = option(None, "The --eval_files NAME whose --best_metric chooses the best "
                                   "checkpoint (a dev set, never the test set); default the first, with a warning.")
    seed: int = option(0, "Seed of the head init, data order, dropout and subsampling.")
    text_column: str = option("sentence", "Text column (a name, or a number from 0 with --noheader).")
    pair_column: str | None = option(None, "Second text column (sentence pairs).")
    label_column: str = option("label", "Label column.")
    header: bool = option(True, "TSV/CSV files start with a header row naming the columns; with "
                          "--noheader give the columns as numbers from 0 (e.g. --text_column=1).")
    encoding: str = option("utf-8", "Text encoding of every input file (e.g. latin-1).")
    labels: tuple[str, ...] = option((), "Label set in order (default: sorted labels of the train file).")
    tag_scheme: str = option("IOB2", "Tag scheme of the CoNLL files.", choices=SCHEMES)
    output_scheme: str = option("BIOES", "Scheme the tagger learns and decodes.", choices=SCHEMES)
    max_seq_length: int = option(128, "Tokens per row.", lower=8)
    doc_stride: int = option(128, "QA: tokens between window starts.", lower=1)
    max_query_length: int = option(64, "QA: question tokens kept.", lower=1)
    max_answer_length: int = option(30, "QA: longest answer in tokens.", lower=1)
    n_best: int = option(20, "QA: start/end candidates searched.", lower=1)
    null_threshold: float | None = option(None, "SQuAD v2.0: predict no answer when null beats best span by this.")
    batch_size: int = option(32, "Global batch size.", lower=1)
    learning_rate: float = option(2e-5, "Peak learning rate (0: a frozen run, a useful probe).", lower=0.0)
    epochs: float = option(3.0, "Training epochs.", lower=1.0)
    warmup_proportion: float = option(0.1, "Fraction of steps of linear warmup.", lower=0.0, upper=1.0)
    eval_every: int = option(0, "Steps between evaluations (0: at the end).", lower=0)
    max_train_examples: int | None = option(None, "Seeded subsample of the training set.")
    dropout: float | None = option(None, "Override the checkpoint's dropout.")
    dtype: str = option("float32", "Compute dtype.", choices=("float32", "bfloat16"))
    checkpoint_every: int = option(500, "Steps between checkpoints (0: only at the end); a rerun on the "
                                   "same --workdir resumes from the last one.", lower=0, resume=MAY_CHANGE)
    keep_checkpoints: int = option(2, "Checkpoints kept.", lower=1, resume=MAY_CHANGE)


# -------------------------------------------------------------------- predict ----
@dataclasses.dataclass(frozen=True)
class PredictOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("checkpoint", "input", "output")
    checkpoint: str | None = option(None, "The best/ folder of a finetune run.")
    input: str | None = option(None, "Unlabeled input: TSV/CSV/JSONL rows (classification, regression), "
                               "one word per line (ner), SQuAD JSON (qa).")
    output: str | None = option(None, "File to write: TSV (classification, regression), CoNLL (ner), "
                                "{id: answer} JSON (qa).")
    batch_size: int = option(64, "Rows per forward pass.", lower=1)
    # Read the input differently from the training files (None: as the run read them).
    text_column: str | None = option(None, "Text column of --input (default: the run's).")
    pair_column: str | None = option(None, "Second text column of --input (default: the run's).")
    header: bool | None = option(None, "Whether --input has a header row (default: as the run's files).")
    encoding: str | None = option(None, "Text encoding of --input (default: the run's).")
    compilation_cache: str = _model_job_cache()


# -------------------------------------------------------------------- heldout ----
@dataclasses.dataclass(frozen=True)
class HeldoutOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("checkpoint", "text")
    checkpoint: str | None = option(None, "A model with an MLM head: a pretraining workdir, its best/, our "
                                    "converted folder or a Hugging Face folder (BertForPreTraining, *ForMaskedLM, ...).")
    text: str | None = option(None, "Comma-separated text files or globs to evaluate on.")
    out: str | None = option(None, "Write the figures to this JSON file as well.")
    max_seq_length: int = option(128, "Tokens per row.", lower=8)
    max_predictions_per_seq: int = option(20, "MLM positions per row.", lower=1)
    masked_lm_prob: float = option(0.15, "Fraction of tokens masked, in (0, 1].", lower=0.0, upper=1.0)
    batch_size: int = option(32, "Rows per batch.", lower=1)
    batches: int = option(20, "Batches of each kind scored (MLM rows, NSP pairs, SOP pairs).", lower=1)
    seed: int = option(12345, "Seed of the rows, pairs and masks: keep it to compare checkpoints "
                       "(with the same tokenizer they see the same masks).")
    document_boundary: str = option("file", "What separates documents (NSP draws from other documents).",
                                    choices=("file", "blank_line"))
    sentence_splitter: str = option("pysbd", "Sentence splitter (pretraining's --sentence_splitter: the same one "
                                    "scores the rows a run's held-out evaluation scored).",
                                    choices=("pysbd", "blingfire"))
    cache_dir: str | None = option(None, "Tokenized-text cache, kept for the next run (default: a "
                                   "temporary folder, removed at the end).")
    compilation_cache: str = _model_job_cache()

    def __post_init__(self):
        _some_masked(self.masked_lm_prob)


# --------------------------------------------------------------------- encode ----
@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("checkpoint", "input", "output")
    checkpoint: str | None = option(None, "Checkpoint folder (ours or Hugging Face).")
    input: str | None = option(None, ".txt (text or text<TAB>text per line) or .jsonl (text, text_pair).")
    output: str | None = option(None, "Output .npz file.")
    max_length: int = option(512, "Truncate inputs to this many tokens.", lower=3)
    batch_size: int = option(32, "Texts per forward pass.", lower=1)
    compilation_cache: str = _model_job_cache()


# -------------------------------------------------------------------- convert ----
@dataclasses.dataclass(frozen=True)
class ConvertOptions:
    from_hf: str | None = option(None, "Hugging Face folder to import.")
    out: str | None = option(None, "Our checkpoint folder to write (with --from_hf).")
    checkpoint: str | None = option(None, "Our checkpoint folder to export.")
    to_hf: str | None = option(None, "Hugging Face folder to write (with --checkpoint).")
    hf_dtype: str = option("float32", "Exported tensor dtype.", choices=("float32", "bfloat16"))

    def __post_init__(self):
        if bool(self.from_hf) == bool(self.checkpoint):
            raise ValueError("give either --from_hf=DIR --out=DIR or --checkpoint=DIR --to_hf=DIR")
        if self.from_hf and not self.out:
            raise ValueError("--from_hf needs --out")
        if self.checkpoint and not self.to_hf:
            raise ValueError("--checkpoint needs --to_hf")


# ---------------------------------------------------------------------- split ----
@dataclasses.dataclass(frozen=True)
class SplitOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("input", "out")
    kind: str = option("rows", "What to split: rows (a TSV with a header) or squad_articles (SQuAD JSON, whole "
                       "articles on each side).", choices=("rows", "squad_articles"))
    input: str | None = option(None, "File to split.")
    out: str | None = option(None, "Folder for the two parts (train and dev).")
    dev_size: int = option(408, "rows: dev rows (GLUE's MRPC dev has 408).", lower=1)
    dev_fraction: float = option(0.25, "squad_articles: share of articles for dev.", lower=0.0, upper=1.0)
    seed: int = option(0, "Seed of the draw.")


# --------------------------------------------------------------- side_by_side ----
@dataclasses.dataclass(frozen=True)
class SideBySideOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)
    out: str | None = option(None, "Output folder.")
    init_checkpoint: str | None = option(None, "Hugging Face model folder (both sides).")
    parallel: int = option(1, "Runs at a time.", lower=1)
    deadline_s: float | None = option(None, "Start nothing after this many seconds; stop what still runs.")
    collect: bool = option(False, "Run nothing: tabulate the finished runs already under --out.")
    runs: tuple[str, ...] = internal((), "NAME[:SEEDS] of experiments/finetune/NAME.flags (positional)")
    extra: tuple[str, ...] = internal((), "--flag=value given to every run (after --)")


# ---------------------------------------------------------------------- sweep ----
@dataclasses.dataclass(frozen=True)
class SweepOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("job", "base", "out")
    job: str | None = option(None, "The job every run is.", choices=("pretrain", "finetune"))
    base: str | None = option(None, "The base flag file of every run (absl's own --flagfile "
                              "expands files into this job's flags, so the base is named here).")
    grid: str = option("", "FLAG=a,b;FLAG2=x,y: the runs are every combination (empty: the base alone).")
    seeds: tuple[str, ...] = option(("0",), "Seeds run for every combination (--seed of each run).")
    out: str | None = option(None, "Sweep folder: one workdir per run, named after its varied flags.")
    parallel: int = option(1, "Runs at a time.", lower=1)
    init_sweep: str | None = option(None, "finetune: a pretraining sweep folder; every finished run of it "
                                    "becomes a value of --init_checkpoint (its best/ if kept, else its workdir).")


# ------------------------------------------------------------ report, tokenizer ----
@dataclasses.dataclass(frozen=True)
class ReportOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("runs", "out")
    runs: str | None = option(None, "Folder holding run folders (or one run).")
    out: str | None = option(None, "Folder to write report.md, report.csv and PNGs to.")


@dataclasses.dataclass(frozen=True)
class TokenizerBenchOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("vocab", "corpus")
    vocab: str | None = option(None, "Tokenizer folder.")
    corpus: str | None = option(None, "Comma-separated globs.")
    batch_lines: int = option(4096, "Lines per encode_batch call.", lower=1)


def _flag_fields(o):
    """(flag name, field, value) of every flag-bearing field of the options instance `o`,
    nested options included."""
    for f in dataclasses.fields(o):
        v = getattr(o, f.name)
        if dataclasses.is_dataclass(v):
            yield from _flag_fields(v)
        elif f.metadata.get("flag", "") is not None:
            yield f.metadata.get("flag") or f.name, f, v


def resume_rules(o) -> dict[str, str]:
    """{flag name: SAME, MAY_CHANGE or PHASE} of every flag-bearing field of `o`."""
    return {name: f.metadata.get("resume", SAME) for name, f, _ in _flag_fields(o)}


def flat(o) -> dict[str, Any]:
    """{flag name: value} of every flag-bearing field of `o`: the run record that a
    resumed run is compared with."""
    return {name: v for name, _, v in _flag_fields(o)}
