"""Options are written once: each job's options dataclass generates its flags, one flag
per option and one default (the field's), and library code never imports the flag layer."""

import ast
import dataclasses
import pathlib
import sys

import pytest
from absl import flags as absl_flags

from bert_jax import flags, options

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_JOBS = next(l for l in (REPO / "launch.sh").read_text().splitlines() if l.startswith("jobs=")
                   ).split("=", 1)[1].strip('"').split()
JOBS = {  # job module -> its options class: every ./launch.sh job, and the peers
    **{job: getattr(options, "".join(w.title() for w in job.split("_")) + "Options") for job in LAUNCH_JOBS},
    "peers.side_by_side": options.SideBySideOptions, "peers.hf_finetune": options.FinetuneOptions,
}


def job_flags(cls) -> dict:
    fv = absl_flags.FlagValues()
    flags.define(cls, fv)
    return {name: fv[name] for name in fv}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_option_has_one_flag_and_one_default(job):
    cls = JOBS[job]
    fields = list(flags.fields(cls))
    names = [f.flag for f in fields]
    assert len(names) == len(set(names)), f"{job}: two options share a flag"
    defined = job_flags(cls)
    assert set(defined) == set(names), f"{job}: flags without an option or options without a flag"
    for f in fields:
        default = f.field.default
        flag_default = defined[f.flag].default
        if isinstance(default, tuple):
            flag_default = tuple(flag_default) if not f.field.metadata.get("parse") else f.field.metadata["parse"](flag_default)
        assert flag_default == default, f"--{f.flag}: flag default {flag_default!r}, option default {default!r}"
        assert defined[f.flag].help and defined[f.flag].help != f.flag, f"--{f.flag} has no help"
    # Parsing nothing but the required flags gives the dataclass's defaults.
    fv = absl_flags.FlagValues()
    flags.define(cls, fv, required=False)
    extra = ["--from_hf=a", "--out=b"] if cls is options.ConvertOptions else []
    fv(["x", *extra])
    got = flags.read(cls, fv)
    want_kw = {"from_hf": "a", "out": "b"} if extra else {}
    want = cls(**want_kw)
    if hasattr(want, "resolved_flags"):
        want = dataclasses.replace(want, resolved_flags=got.resolved_flags)
    assert got == want


def test_the_job_modules_use_their_options_class():
    for job, cls in JOBS.items():
        folder = "bert_jax" if job.startswith("peers.") else "bert_jax/jobs"
        src = (REPO / folder / (job.replace(".", "/") + ".py")).read_text()
        assert "run_job(" in src and cls.__name__ in src, job


def _imports(path: pathlib.Path) -> set[str]:
    """bert_jax modules imported at module level (not under `if __name__ == ...`)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        for sub in ([node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []):
            if isinstance(sub, ast.ImportFrom) and sub.module:
                out |= {f"{sub.module}.{a.name}" for a in sub.names} | {sub.module}
            elif isinstance(sub, ast.Import):
                out |= {a.name for a in sub.names}
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and sub.module:
                    out |= {f"{sub.module}.{a.name}" for a in sub.names} | {sub.module}
    return out


def test_only_the_flag_layer_defines_absl_flags():
    """A module defining absl flags at import time adds them to every job that imports it
    (and escapes the options classes): only flags.py turns options into flags."""
    for path in (REPO / "bert_jax").rglob("*.py"):
        if path.name != "flags.py":
            assert "DEFINE_" not in path.read_text(), f"{path.relative_to(REPO)} defines absl flags"


def test_library_code_never_imports_the_flag_layer():
    for path in (REPO / "bert_jax").rglob("*.py"):
        if path.parent.name in ("jobs", "peers") or path.name == "flags.py":  # the jobs and the flag layer
            continue
        assert "bert_jax.flags" not in _imports(path), f"{path.relative_to(REPO)} imports the flag layer"
    assert not {m for m in _imports(REPO / "bert_jax/options.py") if m.startswith("bert_jax")}


def test_help_lists_the_jobs_own_flags():
    import subprocess
    out = subprocess.run([sys.executable, "-m", "bert_jax.jobs.vocab", "--help"], capture_output=True, text=True).stdout
    assert "--vocab_size" in out and "--kind" in out and "--xla_" not in out


def test_every_error_class_is_a_bert_jax_error_and_jobs_print_it_without_a_traceback(tmp_path):
    import importlib
    import subprocess

    from bert_jax.errors import BertJaxError
    classes = []
    for path in (REPO / "bert_jax").rglob("*.py"):
        mod = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        classes += [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, Exception)
                    and v.__module__ == mod.__name__]
    assert len(classes) >= 13 and all(issubclass(c, BertJaxError) for c in classes), classes
    r = subprocess.run([sys.executable, "-m", "bert_jax.jobs.finetune", "--task=ner", f"--init_checkpoint={tmp_path}",
                        f"--train_file={tmp_path}/none.txt", f"--workdir={tmp_path}/wd"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"finetune: error: --train_file={tmp_path}/none.txt: no such file" in r.stderr


@pytest.mark.parametrize("cls,bad,name", [
    (options.PretrainOptions, "--learning_rate=-1", "learning_rate"),
    (options.FinetuneOptions, "--learning_rate=-1e-5", "learning_rate"),
    (options.FinetuneOptions, "--epochs=0", "epochs"),
    (options.FinetuneOptions, "--epochs=-1", "epochs"),
    (options.PretrainOptions, "--masked_lm_prob=0", "masked_lm_prob"),
    (options.HeldoutOptions, "--masked_lm_prob=0", "masked_lm_prob")])
def test_nonsense_optimization_settings_are_refused_by_name(cls, bad, name):
    """A negative learning rate trained to a held-out loss of 309, epochs=0 or -1 ran one
    step, masked_lm_prob=0 failed late with a traceback: each is named at the flag layer
    (a learning rate of 0 stays allowed: a frozen run is a useful probe)."""
    fv = absl_flags.FlagValues()
    flags.define(cls, fv, required=False)
    with pytest.raises((absl_flags.IllegalFlagValueError, flags.FlagError), match=name):
        fv([sys.argv[0], bad])
        flags.read(cls, fv)
    fv = absl_flags.FlagValues()
    flags.define(cls, fv, required=False)
    fv([sys.argv[0], "--learning_rate=0" if "learning_rate" in [f.flag for f in flags.fields(cls)] else "--seed=1"])
    flags.read(cls, fv)


def _choices(cls, name):
    return next(f.field.metadata["choices"] for f in flags.fields(cls) if f.flag == name)


def test_choices_are_the_registries_they_name():
    """options.py imports nothing of bert_jax, so its `choices` are written out; each must
    be the registry that serves it (adding an entry there and not here, or the reverse,
    fails here rather than as a KeyError after start-up)."""
    from bert_jax.data import cache, tokenizer
    from bert_jax.model import config, encoder, objectives
    from bert_jax.tasks import finetune_tasks, tagging
    from bert_jax.training import finetuning, optim
    assert options.FAMILIES == config.FAMILIES
    assert options.DEFAULT_VARIANT in config.VARIANTS
    pairs = {
        ("objective", options.ModelOptions): tuple(objectives.OBJECTIVES),
        ("share_scope", options.ModelOptions): config.SHARE_SCOPES,
        ("hidden_act", options.ModelOptions): tuple(encoder.ACTIVATIONS),
        ("remat_policy", options.ModelOptions): ("none", *encoder.REMAT_POLICIES),
        ("attention_impl", options.ModelOptions): config.ATTENTION_IMPLS,
        ("sentence_splitter", options.PretrainOptions): cache.SPLITTERS,
        ("sentence_splitter", options.HeldoutOptions): cache.SPLITTERS,
        ("kind", options.VocabOptions): tokenizer.KINDS,
        ("task", options.FinetuneOptions): tuple(finetune_tasks.TASKS),
        ("tag_scheme", options.FinetuneOptions): tagging.SCHEMES,
        ("output_scheme", options.FinetuneOptions): tagging.SCHEMES,
    }
    for (name, cls), registry in pairs.items():
        assert set(_choices(cls, name)) == set(registry), f"--{name}: choices {_choices(cls, name)}, registry {registry}"
    assert config.ACTIVATIONS == tuple(encoder.ACTIVATIONS) and config.OBJECTIVES == tuple(objectives.OBJECTIVES)
    assert config.REMAT_POLICIES == ("none", *encoder.REMAT_POLICIES)
    assert finetuning.TASKS == tuple(finetune_tasks.TASKS)
    from bert_jax.data import instances
    from bert_jax.jobs import heldout
    assert {o.instance_kind for o in objectives.OBJECTIVES.values()} | {k for k, _ in heldout.KINDS.values()} \
        <= set(instances.KINDS)
    # every choice is served, not only listed: each builds
    import jax.numpy as jnp
    params = {"dense": {"kernel": jnp.ones((2, 2))}}
    for name in _choices(options.OptimizerOptions, "optimizer"):
        tx = optim.make(options.OptimConfig(optimizer=name, train_steps=10, warmup_steps=1))
        updates, _ = tx.update(params, tx.init(params), params)
        assert updates["dense"]["kernel"].shape == (2, 2), name
    for name in cache.SPLITTERS:
        assert len(cache.splitter_fn(name)("One sentence here. Another one there.")) == 2, name
