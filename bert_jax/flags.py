"""The command line: absl flags generated from the options dataclasses (options.py) and
read back into them.

Jobs call `run_job(main, OptionsClass)`: the flags of the class's fields are defined,
`--help` lists them, and `main` gets the parsed, typed, frozen options. Tests parse flag
files with a private FlagValues through `define` and `read`. Library code never imports
this module.
"""

from __future__ import annotations

import dataclasses
import logging as std_logging
import os
import pathlib
import sys
import types
import typing
from typing import Any, Iterator

from absl import flags

from bert_jax import options
from bert_jax.errors import BertJaxError

FLAGS = flags.FLAGS


class FlagError(BertJaxError, ValueError):
    """A flag value is invalid; the message names the flag."""


# --------------------------------------------------------------- generation ----
@dataclasses.dataclass(frozen=True)
class FlagField:
    flag: str
    field: dataclasses.Field
    kind: Any           # the field's type with None removed: int, float, str, bool, tuple
    path: tuple[str, ...]  # field names from the options class down to this field


def _kind(tp) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def fields(cls, path: tuple[str, ...] = ()) -> Iterator[FlagField]:
    """Every flag-bearing field of `cls`, nested options classes included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _kind(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from fields(tp, path + (f.name,))
            continue
        name = f.metadata.get("flag", "")
        if name is None:  # set by the job, not a flag
            continue
        yield FlagField(name or f.name, f, tp, path + (f.name,))


def define(cls, fv: flags.FlagValues = FLAGS, required: bool = True) -> None:
    """One absl flag per option field of `cls`, with its help, default, choices and
    bounds; `cls.REQUIRED` marked required (unless `required` is False)."""
    for ff in fields(cls):
        md, default = ff.field.metadata, ff.field.default
        kw = dict(flag_values=fv)
        help_text = md.get("help") or ff.flag
        if md.get("choices"):
            flags.DEFINE_enum(ff.flag, default, list(md["choices"]), help_text, **kw)
        elif ff.kind is bool:
            flags.DEFINE_bool(ff.flag, default, help_text, **kw)
        elif typing.get_origin(ff.kind) is tuple:
            flags.DEFINE_list(ff.flag, [str(x) if not isinstance(x, tuple) else "=".join(x) for x in default],
                              help_text, **kw)
        elif ff.kind in (int, float):
            define_num = flags.DEFINE_integer if ff.kind is int else flags.DEFINE_float
            define_num(ff.flag, default, help_text, lower_bound=md.get("lower"),
                       upper_bound=md.get("upper"), **kw)
        elif ff.kind is str:
            flags.DEFINE_string(ff.flag, default, help_text, **kw)
        else:
            raise TypeError(f"{cls.__name__}.{ff.field.name}: no flag type for {ff.kind}")
    if required and getattr(cls, "REQUIRED", ()):
        flags.mark_flags_as_required(list(cls.REQUIRED), flag_values=fv)


def _build(cls, values: dict[tuple[str, ...], Any], path: tuple[str, ...] = (), outer: dict | None = None):
    """`cls` from the flag values; a nested class's field that is not a flag takes the
    enclosing class's option of the same name (OptimConfig.train_steps <- --train_steps)."""
    hints = typing.get_type_hints(cls)
    here = {p[-1]: v for p, v in values.items() if p[:-1] == path}
    kw = {}
    for f in dataclasses.fields(cls):
        tp = _kind(hints[f.name])
        if dataclasses.is_dataclass(tp):
            kw[f.name] = _build(tp, values, path + (f.name,), here)
        elif path + (f.name,) in values:
            kw[f.name] = values[path + (f.name,)]
        elif f.metadata.get("flag", "") is None and outer and f.name in outer:
            kw[f.name] = outer[f.name]
    return cls(**kw)


def read(cls, fv: flags.FlagValues = FLAGS, argv=None, positional: bool = False):
    """The parsed flags as a `cls` instance (nested options included). Positional
    arguments are an error unless `positional`. Invalid combinations that the class
    checks are a FlagError naming the flag."""
    if not positional and argv is not None and len(argv) > 1:
        raise FlagError(f"unexpected positional arguments {argv[1:]} (flags need --name=value)")
    values = {}
    for ff in fields(cls):
        v = fv[ff.flag].value
        if typing.get_origin(ff.kind) is tuple:
            parse = ff.field.metadata.get("parse")
            v = parse(v) if parse else tuple(v)
        values[ff.path] = v
    if any(f.name == "resolved_flags" for f in dataclasses.fields(cls)):
        values[("resolved_flags",)] = fv.flags_into_string()
    try:
        return _build(cls, values)
    except ValueError as e:
        raise FlagError(str(e)) from None


# ------------------------------------------------------------------ the jobs ----
def apply_determinism(o: options.DistributedOptions) -> None:
    """Set XLA's deterministic-ops flag before JAX starts its back end."""
    if o.deterministic_gpu:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_deterministic_ops=true").strip()


def init_distributed(o: options.DistributedOptions) -> None:
    """jax.distributed.initialize from the flags; or from the environment inside a SLURM
    job step of several tasks (SLURM's variables: jax's own detection) or on a Cloud TPU
    pod worker started by `launch.sh --tpu` (BERT_JAX_AUTO_DISTRIBUTED=1); nothing for a
    single local process. CPU processes talk through gloo."""
    import jax
    slurm = (int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ
             and "SLURM_PROCID" in os.environ)
    if not (o.coordinator_address or o.num_processes or slurm or os.environ.get("BERT_JAX_AUTO_DISTRIBUTED")):
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if o.coordinator_address or o.num_processes:
        jax.distributed.initialize(o.coordinator_address, o.num_processes, o.process_id,
                                   heartbeat_timeout_seconds=o.heartbeat_timeout)
    else:
        jax.distributed.initialize(heartbeat_timeout_seconds=o.heartbeat_timeout)


# Errors of a collective or of the coordination service whose cause is another process gone.
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout", "Gloo",
             "NCCL", "UNAVAILABLE", "Barrier", "coordination service", "Socket closed")


def exit_multiprocess(e: BaseException) -> None:
    """In a multi-process job, an error ends this process now with a clear message (bad
    input, a BertJaxError, without a traceback, as in a single process), without
    JAX's shutdown barrier (which waits for every process: a dead one makes it wait out the
    heartbeat timeout, then abort). Checkpoints already complete stay valid; one being
    written is left incomplete, and a restart ignores it."""
    import jax
    job = pathlib.Path(sys.argv[0]).stem
    text = f"{type(e).__name__}: {e}"
    if any(k in text for k in PEER_LOST):
        msg = (f"{job}: error: process {jax.process_index()} of {jax.process_count()} lost contact with another "
               f"process (it died or was killed); stopping. Rerun the same command to resume from the last "
               f"complete checkpoint. ({text.splitlines()[0][:300]})")
    elif isinstance(e, BertJaxError):  # bad input: the message says what
        msg = f"{job}: error: {e}"
    else:
        import traceback
        traceback.print_exception(e)
        msg = f"{job}: error: process {jax.process_index()} of {jax.process_count()} failed: {text.splitlines()[0][:500]}"
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def quiet_library_logs(fv: flags.FlagValues = FLAGS) -> None:
    """Libraries (orbax logs every checkpoint step at INFO through absl) keep their
    warnings only, unless --verbosity is 1 or more; bert_jax's own INFO lines stay."""
    if fv.is_parsed() and fv["verbosity"].value >= 1:
        return

    class _QuietLibraries(std_logging.Filter):
        def filter(self, record):
            return record.levelno >= std_logging.WARNING or "/bert_jax/" in record.pathname
    for h in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
        h.addFilter(_QuietLibraries())


def _multiprocess() -> bool:
    import jax
    return jax.distributed.is_initialized()


def run_job(main, cls, positional: bool = False) -> None:
    """Define the flags of options class `cls`, make `--help` list them (absl lists the
    main module's key flags; ours are defined here), quiet library logs, then run
    `main(options)` (`main(options, argv)` with `positional`). Options that set up JAX
    (determinism, jax.distributed) are applied first."""
    from absl import app
    define(cls)
    for flag in FLAGS.get_key_flags_for_module(sys.modules[__name__]):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def _main(argv):
        quiet_library_logs()
        try:
            o = read(cls, FLAGS, argv, positional)
            if isinstance(o, options.DistributedOptions):
                apply_determinism(o)
                init_distributed(o)
            return main(o, argv) if positional else main(o)
        except BertJaxError as e:  # bad input: the message says what; no traceback
            if _multiprocess():
                exit_multiprocess(e)
            job = pathlib.Path(sys.argv[0]).stem
            print(f"{job}: error: {e}", file=sys.stderr)
            sys.exit(1)
        except Exception as e:
            if _multiprocess():
                exit_multiprocess(e)
            raise
    app.run(_main)
