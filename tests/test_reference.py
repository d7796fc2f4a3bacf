"""The real all-MiniLM-L6-v2 weights (a pretrained BERT) loaded into our model reproduce
the reference outputs in ../shared/data/reference within 1e-4, from the reference's own
token ids."""

import json

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from bert_jax.interop import rename
from bert_jax.model.heads import build_model

TOL = 1e-4


def test_minilm_reproduces_reference_outputs(shared_data, minilm_dir):
    ref = np.load(shared_data / "reference" / "minilm_l6_v2_reference.npz")
    cfg = rename.config_from_hf(json.loads((minilm_dir / "config.json").read_text()))
    params = rename.from_hf(load_file(str(minilm_dir / "model.safetensors")), cfg, "base")
    ids, types, mask = (jnp.asarray(ref[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))
    out = build_model(cfg, "base").apply({"params": params}, ids, types, mask,
                                         output_hidden_states=True)
    real = np.asarray(ref["attention_mask"]).astype(bool)
    assert list(ref["hidden_layers"]) == [0, 1, 6]
    for i, layer in enumerate(ref["hidden_layers"]):
        ours = np.asarray(out["hidden_states"][layer])[real]
        err = np.abs(ours - ref["hidden_states_packed"][i]).max()
        assert err <= TOL, f"hidden state {layer}: max |diff| {err:.2e}"
    err = np.abs(np.asarray(out["pooled_output"]) - ref["pooler_output"]).max()
    assert err <= TOL, f"pooler: max |diff| {err:.2e}"
    # The sentence embedding: masked mean of the last layer, L2-normalised.
    h = np.asarray(out["sequence_output"])
    mean = (h * real[..., None]).sum(1) / real.sum(1, keepdims=True)
    emb = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    assert np.abs(emb - ref["sentence_embedding"]).max() <= TOL
