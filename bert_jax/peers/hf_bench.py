"""The peer of `bench --peer=hf`: Hugging Face transformers (PyTorch eager) timed on the
step `bench` just timed, in the same process on the same cores: the transformers class
that holds the same pretraining heads (BertForMaskedLM for --objective=mlm,
BertForPreTraining for mlm_nsp, AlbertForPreTraining for SOP, ...), built from the same
config, on the same batch and masked positions, with AdamW (same betas, epsilon, weight
decay), clipping at the same norm, dropout on. transformers scores its MLM head on every
position (labels -100 elsewhere); ours gathers the masked ones first, which is part of
what the ratio measures. float32, or bf16 autocast where bench runs bfloat16. Needs the
`test` extra (torch, transformers)."""

from __future__ import annotations

import time

import numpy as np

from bert_jax.errors import BertJaxError
from bert_jax.interop import convert, rename
from bert_jax.model.config import ModelConfig
from bert_jax.options import OptimConfig

SENTENCE_LABEL = {"mlm_nsp": "next_sentence_label", "mlm_sop": "sentence_order_label"}


def bench_hf(cfg: ModelConfig, ocfg: OptimConfig, host: dict[str, np.ndarray], steps: int,
             warmup: int) -> dict:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise BertJaxError(f"--peer=hf needs torch and transformers (pip install '.[test]'): {e}") from None
    if ocfg.optimizer != "adamw":
        raise BertJaxError(f"--peer=hf runs AdamW; --optimizer={ocfg.optimizer} has no peer here")
    cls = getattr(transformers, convert.hf_architecture(cfg, "pretraining"))
    config = transformers.AutoConfig.for_model(**rename.hf_config_dict(cfg, "pretraining"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = cls(config).to(device).train()
    ids = host["input_ids"]
    labels = np.full(ids.shape, -100, np.int64)
    np.put_along_axis(labels, host["masked_positions"], host["masked_ids"], 1)
    t = lambda x: torch.from_numpy(np.asarray(x, np.int64)).to(device)
    batch = dict(input_ids=t(ids), token_type_ids=t(host["token_type_ids"]),
                 attention_mask=t(host["attention_mask"]), labels=t(labels))
    if cfg.objective in SENTENCE_LABEL:
        batch[SENTENCE_LABEL[cfg.objective]] = t(host["sentence_labels"][:, 0])
    opt = torch.optim.AdamW(model.parameters(), lr=ocfg.learning_rate, betas=(ocfg.b1, ocfg.b2), eps=ocfg.eps,
                            weight_decay=ocfg.weight_decay)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if ocfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = float(step())  # untimed, as ours' compile is: the first step at init
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return dict(system=f"transformers {transformers.__version__} {cls.__name__} (torch {torch.__version__} "
                       f"eager, {device.type}, {torch.get_num_threads()} threads)",
                seq_len=ids.shape[1], batch_size=ids.shape[0], step_ms=round(dt * 1e3, 3),
                real_tokens_per_s=round(ids.size / dt, 1), first_loss=first, loss=float(loss))
