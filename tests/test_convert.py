"""Checkpoint interoperability with Hugging Face, and the encode job."""

import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bert_jax.interop import convert
from bert_jax.interop import rename
from bert_jax.jobs import encode
from bert_jax.model.heads import build_model

import tiny
from test_hf_parity import HF_CLASSES, hf_model

CASES = [("bert", {}), ("roberta", dict(max_position_embeddings=514)), ("albert", {}),
         ("albert", dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2))]
TASKS = ["base", "pretraining", "sequence_classification", "token_classification", "question_answering"]


def saved_hf(tmp_path, family, kw, task, name="hf"):
    cfg = tiny.config(family, **kw)
    model = hf_model(cfg, task, seed=5)
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    return cfg, model, folder


@pytest.mark.parametrize("family,kw", CASES, ids=["bert", "roberta-514", "albert", "albert-grouped"])
@pytest.mark.parametrize("task", TASKS)
def test_hf_to_ours_to_hf_is_bit_exact(tmp_path, family, kw, task):
    cfg, model, hf_dir = saved_hf(tmp_path, family, kw, task)
    c2, t2, params, _ = convert.load_hf(hf_dir)
    assert t2 == task and c2.family == family
    convert.save_ours(tmp_path / "ours", c2, t2, params, None)
    c3, t3, p3, _ = convert.load(tmp_path / "ours")
    convert.save_hf(tmp_path / "back", c3, t3, p3)
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    ignored = set(rename.HF_TIED[family])
    assert set(back) == {k for k in original if k not in ignored and not k.endswith(rename.HF_IGNORED_SUFFIXES)}
    for k, v in back.items():
        np.testing.assert_array_equal(v, original[k], err_msg=k)


@pytest.mark.parametrize("family,kw", CASES, ids=["bert", "roberta-514", "albert", "albert-grouped"])
@pytest.mark.parametrize("task", ["pretraining", "sequence_classification", "token_classification",
                                  "question_answering"])
def test_export_loads_in_transformers_with_equal_outputs(tmp_path, family, kw, task):
    cfg, model, hf_dir = saved_hf(tmp_path, family, kw, task)
    c, t, params, _ = convert.load_hf(hf_dir)
    out = tmp_path / "export"
    convert.save_hf(out, c, t, params)
    auto = {"pretraining": transformers.AutoModelForPreTraining,
            "sequence_classification": transformers.AutoModelForSequenceClassification,
            "token_classification": transformers.AutoModelForTokenClassification,
            "question_answering": transformers.AutoModelForQuestionAnswering}[task]
    if family == "roberta" and task == "pretraining":
        auto = transformers.AutoModelForMaskedLM
    loaded, info = auto.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == HF_CLASSES[(family, task)]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded.eval()
    ids, types, mask = tiny.batch(c, seed=9)
    ours = build_model(c, t).apply({"params": params}, jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
    with torch.no_grad():
        theirs = loaded(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
                        token_type_ids=torch.tensor(types, dtype=torch.long))
    if task == "pretraining":
        ours_t = ours["mlm_logits"]
        theirs_t = theirs.logits if family == "roberta" else theirs.prediction_logits
    elif task == "question_answering":
        ours_t, theirs_t = jnp.stack(ours), torch.stack([theirs.start_logits, theirs.end_logits])
    else:
        ours_t, theirs_t = ours, theirs.logits
    assert float(np.abs(np.asarray(ours_t) - theirs_t.numpy()).max()) <= 1e-4


def test_sharded_and_bfloat16_exports(tmp_path):
    cfg, model, hf_dir = saved_hf(tmp_path, "bert", {}, "base")
    c, t, params, _ = convert.load_hf(hf_dir)
    convert.save_hf(tmp_path / "sharded", c, t, params, max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded, info = transformers.AutoModel.from_pretrained(tmp_path / "sharded", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, _, again, _ = convert.load_hf(tmp_path / "sharded")  # and back in
    np.testing.assert_array_equal(again["backbone"]["pooler"]["kernel"], params["backbone"]["pooler"]["kernel"])
    convert.save_hf(tmp_path / "bf16", c, t, params, dtype="bfloat16")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "bf16")
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_minilm_convert_then_encode_reproduces_reference(tmp_path, shared_data, minilm_dir):
    ours = tmp_path / "minilm"
    convert.save_ours(ours, *convert.load_hf(minilm_dir)[:3], minilm_dir)
    ref_json = json.loads((shared_data / "reference/minilm_l6_v2_reference.json").read_text())
    ref = np.load(shared_data / "reference/minilm_l6_v2_reference.npz")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": it["text_a"], **({"text_pair": it["text_b"]} if it["text_b"] else {})}) + "\n"
                             for it in ref_json["items"]))
    texts, pairs = encode.read_inputs(jsonl)
    out = encode.encode(ours, texts, pairs, batch_size=5)
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], ref["attention_mask"])
    real = ref["attention_mask"].astype(bool)
    assert np.abs(out["last_hidden_state"][real] - ref["hidden_states_packed"][2]).max() <= 1e-4
    assert np.abs(out["pooler_output"] - ref["pooler_output"]).max() <= 1e-4
    emb = out["mean_embedding"] / np.linalg.norm(out["mean_embedding"], axis=-1, keepdims=True)
    assert np.abs(emb - ref["sentence_embedding"]).max() <= 1e-4


def test_encode_reads_txt_pairs_and_jsonl_with_tabs(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("one text\nleft\tright\n")
    assert encode.read_inputs(txt) == (["one text", "left"], [None, "right"])
    js = tmp_path / "a.jsonl"
    js.write_text(json.dumps({"text": "has\ttab\nand newline"}) + "\n")
    assert encode.read_inputs(js) == (["has\ttab\nand newline"], None)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(encode.EncodeError, match=r"b.jsonl:2"):
        encode.read_inputs(bad)
    for value in ("null", "3", '["a"]'):
        bad.write_text('{"text": "ok"}\n\n{"text": ' + value + '}\n')
        with pytest.raises(encode.EncodeError, match=r"b.jsonl:3: 'text' must be a string, not " + re.escape(value)):
            encode.read_inputs(bad)
    bad.write_text('{"text": "ok", "text_pair": 7}\n')
    with pytest.raises(encode.EncodeError, match=r"b.jsonl:1: 'text_pair' must be a string, not 7"):
        encode.read_inputs(bad)


def test_encode_reports_truncation_and_writes_the_path_given(tmp_path, minilm_dir):
    """A 100k-character input is cut to --max_length and the job says how many were; rows
    are padded to the longest kept input only; the output goes to exactly --output."""
    import subprocess
    import sys
    texts = tmp_path / "in.txt"
    texts.write_text("a short one\n" + "word " * 20_000 + "\nanother short text\n")
    out = tmp_path / "features.out"
    res = subprocess.run([sys.executable, "-m", "bert_jax.jobs.encode", f"--checkpoint={minilm_dir}",
                          f"--input={texts}", f"--output={out}", "--max_length=64"],
                         capture_output=True, text=True, env=dict(__import__("os").environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 of 3 input(s) are longer than --max_length=64 tokens and were truncated (first: input 2)" in res.stderr
    assert f"-> {out} (" in res.stdout and out.exists() and not pathlib.Path(f"{out}.npz").exists()
    z = np.load(out)
    assert z["input_ids"].shape == (3, 64) and z["attention_mask"].sum(1).tolist()[1] == 64


def test_tiny_pretraining_export_gives_same_mlm_logits(tmp_path):
    from bert_jax.training import pretraining
    from bert_jax.data import vocab
    import test_pretrain
    tok = tmp_path / "tok"
    vocab.train("wordpiece", f"{test_pretrain.REPO}/bert_jax/corpus/train/shakespeare-*.txt", 500, tok)
    test_pretrain.TOKENIZER = tok
    pretraining.run(test_pretrain.options(tmp_path / "run", "--train_steps=3"))
    cfg, task, params, tok_dir = convert.load(tmp_path / "run")
    convert.save_hf(tmp_path / "hf", cfg, task, params, tok_dir)
    model, info = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = hf_tok(["the king is dead", "long live the king of scotland"], padding=True, return_tensors="np")
    ours = build_model(cfg, task).apply({"params": params}, jnp.asarray(enc["input_ids"]),
                                        jnp.asarray(enc["token_type_ids"]), jnp.asarray(enc["attention_mask"]))
    with torch.no_grad():
        theirs = model.eval()(**{k: torch.tensor(v) for k, v in enc.items()})
    assert np.abs(np.asarray(ours["mlm_logits"]) - theirs.prediction_logits.numpy()).max() <= 1e-4


def test_bad_folders_are_refused_by_name(tmp_path):
    cfg, model, hf_dir = saved_hf(tmp_path, "bert", {}, "base")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(convert.ConvertError, match="only pytorch_model.bin.*safetensors"):
        convert.load_hf(pickled)
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(convert.ConvertError, match="GPT2LMHeadModel.*not supported"):
        convert.load_hf(gpt)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(hf_dir / "config.json", broken / "config.json")
    save_file({k: v for k, v in tensors.items() if "layer.2.output.dense.weight" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(convert.ConvertError, match=r"layer\.2\.output\.dense\.weight"):
        convert.load_hf(broken)
    wrong = tmp_path / "wrongvocab"
    wrong.mkdir()
    d = json.loads((hf_dir / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(dict(d, vocab_size=120)))
    shutil.copy(hf_dir / "model.safetensors", wrong / "model.safetensors")
    with pytest.raises(convert.ConvertError, match="vocab_size=120 disagrees .* 99 rows"):
        convert.load_hf(wrong)
    # A failed conversion leaves nothing behind in --out.
    out = tmp_path / "out"
    with pytest.raises(Exception):
        convert.save_hf(out, cfg, "base", {"backbone": {}})
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def _tiny_hf(folder, shared_data, **kw):
    import jax
    from flax import linen as nn
    from bert_jax.model.config import ModelConfig
    from bert_jax.model.heads import init_params
    cfg = ModelConfig(family="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=20, max_position_embeddings=32)
    params = jax.device_get(nn.unbox(init_params(cfg, "base", jax.random.key(0))))
    convert.save_hf(folder, cfg, "base", params, shared_data / "vocab/bert-base-uncased", **kw)
    return folder


def test_files_outside_the_model_folder_are_never_read(tmp_path, shared_data):
    """A sharded index naming ../ or absolute paths, a shard or config symlinked elsewhere,
    and a tokenizer file symlinked to /etc/passwd are refused by name, and convert writes
    nothing; a Hugging Face cache snapshot (files linked into ../../blobs) still loads."""
    import os
    import shutil
    src = _tiny_hf(tmp_path / "sharded", shared_data, max_shard_bytes=1_000_000)
    index = src / "model.safetensors.index.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shutil.copy(shard, elsewhere / "x.safetensors")
    original = index.read_text()
    for target in ("../../../../etc/passwd", str(elsewhere / "x.safetensors"), "../elsewhere/x.safetensors"):
        d = json.loads(original)
        d["weight_map"][next(iter(d["weight_map"]))] = target
        index.write_text(json.dumps(d))
        with pytest.raises(convert.ConvertError, match="outside the folder"):
            convert.read_safetensors(src)
    index.write_text(original)
    link = src / "model-linked.safetensors"
    link.symlink_to(elsewhere / "x.safetensors")
    d = json.loads(original)
    d["weight_map"][next(iter(d["weight_map"]))] = link.name
    index.write_text(json.dumps(d))
    with pytest.raises(convert.ConvertError, match="model-linked.safetensors resolves to .*outside the folder"):
        convert.read_safetensors(src)

    hf = _tiny_hf(tmp_path / "hf", shared_data)
    (hf / "special_tokens_map.json").symlink_to("/etc/passwd")
    with pytest.raises(Exception, match="special_tokens_map.json resolves to /etc/passwd, outside the folder"):
        convert.save_ours(tmp_path / "out", *convert.load_hf(hf)[:3], hf)
    assert not (tmp_path / "out").exists()
    (hf / "special_tokens_map.json").unlink()
    os.replace(hf / "config.json", elsewhere / "config.json")
    (hf / "config.json").symlink_to(elsewhere / "config.json")
    with pytest.raises(convert.ConvertError, match="config.json resolves to .*outside the folder"):
        convert.load_hf(hf)

    # The Hugging Face cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>
    cache = tmp_path / "models--org--tiny"
    snap = cache / "snapshots" / "abc123"
    (cache / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in _tiny_hf(tmp_path / "plain", shared_data).iterdir():
        blob = cache / "blobs" / f"blob_{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(pathlib.Path("../../blobs") / blob.name)
    cfg, task, params, tok = convert.load(snap)
    assert task == "base" and tok == snap
    convert.save_ours(tmp_path / "from_cache", cfg, task, params, tok)
