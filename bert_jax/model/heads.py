"""Task heads and the task models built from Backbone + head.

Shape legend as in encoder.py, plus P = max_predictions_per_seq (masked positions per row)
and C = number of labels.

Which models carry the pooler follows the Hugging Face classes, so that weights map one
to one: BERT/ALBERT pretraining and sequence classification use it; RoBERTa's models,
token classification and span QA do not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from bert_jax.model.config import ModelConfig
from bert_jax.model.encoder import Backbone, Dense, Dropout, LayerNorm, activation, bank_param

TASKS = ("base", "pretraining", "sequence_classification", "token_classification",
         "question_answering")


class BaseModel(nn.Module):
    """The backbone with pooler and no head (HF `<Family>Model`), for feature extraction.
    Returns Backbone's dict."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 position_ids_BxL=None, segment_ids_BxL=None, *, deterministic: bool = True,
                 output_hidden_states: bool = False):
        return Backbone(self.cfg, add_pooler=True, name="backbone")(
            input_ids_BxL, token_type_ids_BxL, attention_mask_BxL, position_ids_BxL,
            segment_ids_BxL, deterministic=deterministic, output_hidden_states=output_hidden_states)


class MLMHead(nn.Module):
    """Masked-LM head on gathered positions only: dense H->E, activation, LayerNorm, then
    a decoder tied to the VxE token embeddings, plus an output bias."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, seq_BxLxH, masked_positions_BxP, word_embeddings_VxE):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x_BxPxH = jnp.take_along_axis(seq_BxLxH, masked_positions_BxP[..., None], axis=1)
        x_BxPxE = Dense((c.embed_dim,), ("embed", "embed_out"), dt, name="transform")(x_BxPxH)
        x_BxPxE = LayerNorm(c.layer_norm_eps, dt, name="norm")(activation(c.hidden_act)(x_BxPxE))
        bias_V = bank_param(self, "bias", nn.initializers.zeros, (c.vocab_size,), ("vocab",), 1)
        logits_BxPxV = jnp.einsum("bpe,ve->bpv", x_BxPxE, word_embeddings_VxE.astype(dt),
                                  preferred_element_type=jnp.float32)
        return logits_BxPxV + bias_V


class PreTrainingModel(nn.Module):
    """MLM plus the sentence head of cfg.objective (objectives.py), if it has one. Returns `mlm_logits` BxPxV (float32) and `sentence_logits` Bx2 (BxKx2 with
    `sentence_positions_BxK`, one per packed example) or None."""
    cfg: ModelConfig

    def setup(self):
        self.objective = self.cfg.pretraining_objective
        self.has_sentence_head = self.objective.sentence_task is not None
        self.backbone = Backbone(self.cfg, add_pooler=self.has_sentence_head)
        self.mlm = MLMHead(self.cfg)
        if self.has_sentence_head:
            self.sentence = Dense((2,), ("embed", "classes"), name="sentence")
            self.sentence_dropout = Dropout(self.cfg.head_dropout)

    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 masked_positions_BxP=None, position_ids_BxL=None, segment_ids_BxL=None,
                 *, sentence_positions_BxK=None, deterministic: bool = True):
        out = self.backbone(input_ids_BxL, token_type_ids_BxL, attention_mask_BxL,
                            position_ids_BxL, segment_ids_BxL, deterministic=deterministic,
                            pool_positions_BxK=sentence_positions_BxK)
        if masked_positions_BxP is None:  # every position (for parity checks and scoring)
            B, L = input_ids_BxL.shape
            masked_positions_BxP = jnp.broadcast_to(jnp.arange(L), (B, L))
        result = {"mlm_logits": self.mlm(out["sequence_output"], masked_positions_BxP,
                                         self.backbone.word_embeddings()),
                  "sentence_logits": None}
        if self.has_sentence_head:
            pooled_BxH = out["pooled_output"]
            if self.objective.sentence_dropout:  # as HF AlbertSOPHead: dropout first
                pooled_BxH = self.sentence_dropout(pooled_BxH, deterministic=deterministic)
            result["sentence_logits"] = self.sentence(pooled_BxH).astype(jnp.float32)
        return result


class SequenceClassifier(nn.Module):
    """Sentence / sentence-pair classification, or regression when num_labels == 1.
    BERT/ALBERT: dropout(pooled) -> dense. RoBERTa: [CLS] -> dropout -> dense H tanh ->
    dropout -> dense (RobertaClassificationHead). Returns logits BxC (float32)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 position_ids_BxL=None, segment_ids_BxL=None, *, deterministic: bool = True):
        c, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        roberta = c.family == "roberta"
        out = Backbone(c, add_pooler=not roberta, name="backbone")(
            input_ids_BxL, token_type_ids_BxL, attention_mask_BxL, position_ids_BxL,
            segment_ids_BxL, deterministic=deterministic)
        drop = Dropout(c.head_dropout)
        if roberta:
            x_BxH = drop(out["sequence_output"][:, 0], deterministic=deterministic)
            x_BxH = jnp.tanh(Dense((c.hidden_size,), ("embed", "embed_out"), dt,
                                   name="classifier_dense")(x_BxH))
        else:
            x_BxH = out["pooled_output"]
        x_BxH = drop(x_BxH, deterministic=deterministic)
        return Dense((c.num_labels,), ("embed", "classes"), dt, name="classifier")(x_BxH).astype(jnp.float32)


class TokenClassifier(nn.Module):
    """Per-token labels (NER): dropout -> dense. Returns logits BxLxC (float32)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 position_ids_BxL=None, segment_ids_BxL=None, *, deterministic: bool = True):
        c = self.cfg
        out = Backbone(c, add_pooler=False, name="backbone")(
            input_ids_BxL, token_type_ids_BxL, attention_mask_BxL, position_ids_BxL,
            segment_ids_BxL, deterministic=deterministic)
        x_BxLxH = Dropout(c.head_dropout)(out["sequence_output"], deterministic=deterministic)
        return Dense((c.num_labels,), ("embed", "classes"), jnp.dtype(c.dtype),
                     name="classifier")(x_BxLxH).astype(jnp.float32)


class SpanQA(nn.Module):
    """Extractive QA: dense H->2 on every token. Returns (start_logits, end_logits), each
    BxL (float32)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None,
                 position_ids_BxL=None, segment_ids_BxL=None, *, deterministic: bool = True):
        c = self.cfg
        out = Backbone(c, add_pooler=False, name="backbone")(
            input_ids_BxL, token_type_ids_BxL, attention_mask_BxL, position_ids_BxL,
            segment_ids_BxL, deterministic=deterministic)
        logits_BxLx2 = Dense((2,), ("embed", "classes"), jnp.dtype(c.dtype),
                             name="qa_outputs")(out["sequence_output"]).astype(jnp.float32)
        return logits_BxLx2[..., 0], logits_BxLx2[..., 1]


def build_model(cfg: ModelConfig, task: str) -> nn.Module:
    """The task model for `task` (one of TASKS); `base` is the backbone with pooler."""
    models = {"base": BaseModel, "pretraining": PreTrainingModel, "sequence_classification": SequenceClassifier,
              "token_classification": TokenClassifier, "question_answering": SpanQA}
    if task not in models:
        raise ValueError(f"task={task!r}: unknown; choose one of {TASKS}")
    return models[task](cfg)


def init_params(cfg: ModelConfig, task: str, rng: jax.Array, seq_len: int = 8, skip: frozenset = frozenset()):
    """Boxed (logically partitioned) params of `build_model(cfg, task)`, less the backbone
    parts named in `skip` (e.g. {"embeddings", "encoder"}: a checkpoint supplies them).
    What is returned is the full init's, bit for bit (flax derives each module's key from
    its path); the skipped parts are never computed (XLA drops what is not returned)."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    init = build_model(cfg, task).init

    def params(r, i):
        p = init(r, i)["params"]
        return {**p, "backbone": {k: v for k, v in p["backbone"].items() if k not in skip}} if skip else p
    return jax.jit(params)(rng, ids)


def abstract_params(cfg: ModelConfig, task: str, seq_len: int = 8):
    """Shapes/dtypes (with logical names) of the params, without allocating them."""
    return jax.eval_shape(lambda r: init_params(cfg, task, r, seq_len), jax.random.key(0))
