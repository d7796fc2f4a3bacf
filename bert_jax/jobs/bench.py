"""`bench` job: times the real pretraining train step of a config.

    ./launch.sh bench --flagfile=experiments/bert_base_phase1.flags --steps=10 --seq_len=128,512

One JSON line per sequence length: compile_s, step_ms, real_tokens_per_s, mfu,
peak_memory_gb, device. `--peer=hf` adds, per length, a line for Hugging Face
transformers (PyTorch eager) on the same config, batch and optimizer, timed in the same
process right after (bert_jax/peers/hf_bench.py), with bert_jax_speedup = its step time
over ours. Batches are random full-length rows (every token real), with
masked_lm_prob of the positions predicted, through the same jitted, sharded step as
`pretrain` (optimizer included).

FLOPs per token (training = 3 x forward, a multiply-add = 2 FLOPs), as the peer script
counts them:  6 * (D * (4 H^2 + 2 H F)          encoder matmuls, D applied layers
                   + D * 2 * L * H              attention scores and weighted sum
                   + (H * E + E * V) * p)       MLM head on the predicted fraction p only
Embedding lookups are not counted. MFU = FLOPs/s over the device's bf16 dense peak.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from bert_jax import flags, sharding
from bert_jax.model.config import ModelConfig, variant
from bert_jax.options import BenchOptions
from bert_jax.training import optim, train

# bf16 dense peak TFLOP/s by device kind (vendor data sheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0}


def flops_per_token(cfg: ModelConfig, seq_len: int, predict_frac: float) -> float:
    H, F, V, E, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.embed_dim, cfg.depth
    enc = D * (4 * H * H + 2 * H * F)
    attn = D * 2 * seq_len * H
    head = (H * E + E * V) * predict_frac
    factorized = E * H if E != H else 0  # the E -> H embedding projection, every token
    return 6.0 * (enc + attn + head + factorized)


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    kind = getattr(device, "device_kind", "")
    for k, v in PEAK_TFLOPS.items():
        if k.lower() in kind.lower():
            return v
    return None


def random_batch(cfg: ModelConfig, batch: int, seq: int, n_pred: int, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, cfg.vocab_size, (batch, seq)).astype(np.int32)
    pos = np.sort(np.stack([rng.choice(seq, n_pred, replace=False) for _ in range(batch)]), 1).astype(np.int32)
    return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
                masked_positions=pos, masked_ids=np.take_along_axis(ids, pos, 1),
                masked_weights=np.ones((batch, n_pred), np.float32),
                sentence_positions=np.zeros((batch, 1), np.int32),
                sentence_labels=rng.integers(0, 2, (batch, 1)).astype(np.int32),
                sentence_weights=np.ones((batch, 1), np.float32))


def bench_one(cfg: ModelConfig, ocfg: optim.OptimConfig, batch_size: int, seq: int,
              predict_frac: float, grad_accum: int, steps: int, warmup: int, mesh, peak) -> dict:
    tx = optim.make(ocfg)
    n_pred = max(1, int(round(predict_frac * seq)))
    _, state_sh = train.state_shardings(cfg, tx, seq, mesh)
    state = train.create_state(cfg, tx, seq, 0, mesh, state_sh)
    host = random_batch(cfg, batch_size, seq, n_pred)
    bsh = lambda nd: sharding.data_sharding(mesh, nd)
    step_fn = train.make_train_step(cfg, tx, grad_accum, state_sh, bsh, host, mesh)
    batch = {k: jax.device_put(v, bsh(v.ndim)) for k, v in host.items()}
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        lower_s = time.perf_counter() - t0
        compiled = lowered.compile()  # from the persistent cache when it holds this step
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, m = compiled(state, batch)
        jax.block_until_ready(state)
        loss_before = float(m["loss"]) if warmup else None
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = compiled(state, batch)
        jax.block_until_ready((state, m))
        dt = (time.perf_counter() - t0) / steps
    tokens = batch_size * seq  # every token is real here
    fpt = flops_per_token(cfg, seq, n_pred / seq)
    dev = jax.devices()[0]
    mem = dev.memory_stats() or {}
    return dict(seq_len=seq, batch_size=batch_size, grad_accum=grad_accum, compile_s=round(compile_s, 3),
                trace_lower_s=round(lower_s, 3),
                step_ms=round(dt * 1e3, 3), real_tokens_per_s=round(tokens / dt, 1),
                tflops_per_s=round(fpt * tokens / dt / 1e12, 3),
                mfu=None if peak is None else round(fpt * tokens / dt / (peak * 1e12), 4),
                peak_memory_gb=(round(mem["peak_bytes_in_use"] / 2**30, 3)
                                if "peak_bytes_in_use" in mem else None),
                device=f"{len(jax.devices())}x {getattr(dev, 'device_kind', dev.platform)}",
                flops_per_token=fpt, xla_flops_per_step=xla_flops(compiled),
                step=int(state.step), loss_before_timing=loss_before, loss=float(m["loss"]))


def xla_flops(compiled) -> float | None:
    """XLA's own count of the compiled step's floating-point operations, per device
    program (an independent check of flops_per_token on one device; a scanned layer body
    is counted once, not per layer)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every back end offers it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_input_pipeline(o: BenchOptions) -> dict:
    """Rows per second of the pretraining input pipeline on one thread (grain's workers are
    threads under one GIL, so this is one core's throughput), with its real-token share."""
    import pathlib
    import tempfile

    from bert_jax.data.tokenizer import Tokenizer
    from bert_jax.errors import BertJaxError
    from bert_jax.training import pretraining
    if not (o.corpus and o.tokenizer):
        raise BertJaxError("--input_pipeline needs --corpus and --tokenizer")
    tok = Tokenizer.load(o.tokenizer)
    cfg = pretraining.model_config(o, tok)
    cache_dir = pathlib.Path(o.cache_dir or tempfile.mkdtemp(prefix="bench_cache_"))
    t0 = time.perf_counter()
    src = pretraining.make_source(o, cfg, tok, o.tokenizer, o.corpus, o.seed, cache_dir, "--corpus")
    prepare_s = time.perf_counter() - t0
    for pos in range(min(200, o.rows)):  # warm the permutation and the caches
        src.example(pos)
    real, t0 = 0, time.perf_counter()
    for pos in range(200, 200 + o.rows):
        real += int(src.example(pos)["attention_mask"].sum())
    dt = time.perf_counter() - t0
    L = o.max_seq_length
    return dict(mode="input_pipeline", seq_len=L, max_examples_per_row=o.max_examples_per_row, instances=o.instances,
                objective=cfg.objective, rows_per_s=round(o.rows / dt, 1),
                row_tokens_per_s=round(o.rows * L / dt, 1), real_tokens_per_s=round(real / dt, 1),
                real_token_fraction=round(real / (o.rows * L), 4), prepare_s=round(prepare_s, 2))


def main(o: BenchOptions):
    if o.input_pipeline:
        print(json.dumps(bench_input_pipeline(o)), flush=True)
        return
    train.use_compilation_cache(o.compilation_cache, o.workdir)
    cfg = variant(o.model.variant).replace(**o.model.overrides())
    ocfg = dataclasses.replace(o.optim, warmup_steps=1, train_steps=10**6)
    mesh = sharding.make_mesh(o.mesh_data, o.mesh_fsdp, o.mesh_tensor)
    peak = peak_tflops(jax.devices()[0], o.peak_tflops)
    for seq in [int(s) for s in o.seq_len] or [o.max_seq_length]:
        cfg.check_sequence_length(seq, "--seq_len")
        rec = bench_one(cfg, ocfg, o.batch_size, seq, o.masked_lm_prob, o.grad_accum,
                        o.steps, o.warmup, mesh, peak)
        rec.update(system="bert_jax", variant=o.model.variant, dtype=cfg.dtype, attention=cfg.attention_impl,
                   remat=cfg.remat_policy, scan=cfg.scan_layers)
        print(json.dumps(rec), flush=True)
        if o.peer == "hf":
            from bert_jax.peers import hf_bench  # torch and transformers: the test extra
            n_pred = max(1, int(round(o.masked_lm_prob * seq)))
            peer = hf_bench.bench_hf(cfg, ocfg, random_batch(cfg, o.batch_size, seq, n_pred), o.steps, o.warmup)
            peer.update(variant=o.model.variant, dtype=cfg.dtype,
                        bert_jax_speedup=round(peer["step_ms"] / rec["step_ms"], 3))
            print(json.dumps(peer), flush=True)


if __name__ == "__main__":
    flags.run_job(main, BenchOptions)
