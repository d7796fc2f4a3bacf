"""Pretraining data properties: masking statistics, special tokens, whole words and
n-grams, NSP/SOP balance, packing through the model, process shares, determinism,
cache reuse, sentence splitting."""

import pathlib

import jax
import numpy as np
import pytest
from flax import linen as nn

from bert_jax import vocab
from bert_jax.data import cache, instances, loader, masking
from bert_jax.heads import build_model, init_params
from bert_jax.tokenizer import Tokenizer

import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN = sorted((REPO / "bert_jax/corpus/train").glob("*.txt"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok") / "wp"
    vocab.train("wordpiece", [str(f) for f in TRAIN], 2000, d)
    return d


@pytest.fixture(scope="module")
def corpus(tok_dir, tmp_path_factory):
    return cache.build(TRAIN, Tokenizer.load(tok_dir), tok_dir, tmp_path_factory.mktemp("cache"))


def synthetic_row(rng, L=64, V=1000):
    ids = rng.integers(10, V, L).astype(np.int32)
    special = np.zeros(L, bool)
    special[[0, 30, L - 1]] = True      # [CLS] A [SEP] B [SEP]
    special[L - 8:] = True              # padding
    word_start = (rng.random(L) < 0.6).astype(np.uint8)
    return ids, special, word_start


def test_masking_rate_and_80_10_10():
    cfg = masking.MaskingConfig(max_predictions_per_seq=20)
    counts = {"mask": 0, "random": 0, "keep": 0}
    for i in range(3000):
        rng = masking.example_rng(7, i)
        ids, special, ws = synthetic_row(np.random.default_rng(i))
        out, pos, lab, w = masking.mask_tokens(ids, special, ws, rng, cfg, 1000, mask_id=3)
        n = int(w.sum())
        assert n == min(20, round((~special).sum() * 0.15))       # 15% of real tokens
        chosen = pos[:n]
        assert not special[chosen].any()                           # never specials/padding
        assert np.array_equal(lab[:n], ids[chosen])
        unchosen = np.setdiff1d(np.arange(len(ids)), chosen)
        assert np.array_equal(out[unchosen], ids[unchosen])        # nothing else changes
        counts["mask"] += int((out[chosen] == 3).sum())
        counts["keep"] += int((out[chosen] == ids[chosen]).sum())
        counts["random"] += int(((out[chosen] != 3) & (out[chosen] != ids[chosen])).sum())
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.01
    assert abs(counts["random"] / total - 0.1) < 0.01
    assert abs(counts["keep"] / total - 0.1) < 0.01


def test_masks_are_a_pure_function_of_seed_and_position():
    cfg = masking.MaskingConfig()
    ids, special, ws = synthetic_row(np.random.default_rng(0))
    a = masking.mask_tokens(ids, special, ws, masking.example_rng(1, 5), cfg, 1000, 3)
    b = masking.mask_tokens(ids, special, ws, masking.example_rng(1, 5), cfg, 1000, 3)
    c = masking.mask_tokens(ids, special, ws, masking.example_rng(1, 6), cfg, 1000, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("max_ngram", [1, 3])
def test_whole_word_and_ngram_masking_mask_whole_words(max_ngram):
    cfg = masking.MaskingConfig(whole_word=True, max_ngram=max_ngram, max_predictions_per_seq=30)
    span_words = []
    for i in range(400):
        ids, special, ws = synthetic_row(np.random.default_rng(100 + i))
        out, pos, lab, w = masking.mask_tokens(ids, special, ws, masking.example_rng(3, i), cfg, 1000, 3)
        chosen = set(pos[: int(w.sum())].tolist())
        word_id = np.cumsum(ws | special)  # a special token also ends a word
        for p in chosen:
            members = np.flatnonzero((word_id == word_id[p]) & ~special)
            assert set(members.tolist()) <= chosen, "a word was only partly masked"
        words = sorted({int(word_id[p]) for p in chosen})
        runs = np.split(words, np.flatnonzero(np.diff(words) != 1) + 1) if words else []
        span_words += [len(r) for r in runs]
    if max_ngram > 1:
        assert max(span_words) >= 3  # n-gram spans of several words occur


def test_nsp_and_sop_labels_are_balanced(corpus):
    for objective in ("nsp", "sop"):
        inst = instances.build(corpus, instances.InstanceConfig(128, objective, 0.1), seed=0)
        frac = inst[:, 4].mean()
        assert 0.4 < frac < 0.6, (objective, frac, len(inst))
        lengths = (inst[:, 1] - inst[:, 0]) + (inst[:, 3] - inst[:, 2])
        assert lengths.max() <= 125 and (inst[:, 1] > inst[:, 0]).all()
    full = instances.build(corpus, instances.InstanceConfig(128, "none", 0.0), seed=0)
    assert ((full[:, 1] - full[:, 0]) <= 126).all()


def source(corpus, tok, objective="nsp", batch=8, procs=(0, 1), seed=0, per_row=1, offset=0,
           short_seq_prob=0.1, instance_len=64):
    tok = Tokenizer.load(tok)
    inst = instances.build(corpus, instances.InstanceConfig(instance_len, objective, short_seq_prob), seed)
    pcfg = loader.PipelineConfig(64, objective, batch, seed, position_offset=offset,
                                 max_examples_per_row=per_row, num_threads=2, prefetch=4)
    mcfg = masking.MaskingConfig(max_predictions_per_seq=10)
    sp = instances.SpecialIds(tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id)
    return loader.PretrainSource(corpus, inst, pcfg, mcfg, sp, tok.vocab_size, *procs)


def batches(src, n, state=None):
    it = loader.make_iterator(src, state)
    return [next(it) for _ in range(n)]


def test_process_shares_are_disjoint_and_make_the_global_batch(corpus, tok_dir):
    single = batches(source(corpus, tok_dir, batch=8), 3)
    p0 = batches(source(corpus, tok_dir, batch=8, procs=(0, 2)), 3)
    p1 = batches(source(corpus, tok_dir, batch=8, procs=(1, 2)), 3)
    for s, a, b in zip(single, p0, p1):
        assert a["input_ids"].shape[0] == 4
        for k in s:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), s[k], err_msg=k)
        assert not np.array_equal(a["input_ids"], b["input_ids"])


def test_same_seed_same_batches_and_resumable_state(corpus, tok_dir):
    a = batches(source(corpus, tok_dir, seed=3), 4)
    b = batches(source(corpus, tok_dir, seed=3), 4)
    c = batches(source(corpus, tok_dir, seed=4), 1)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    it = loader.make_iterator(source(corpus, tok_dir, seed=3))
    next(it), next(it)
    resumed = batches(source(corpus, tok_dir, seed=3), 2, it.get_state())
    np.testing.assert_array_equal(resumed[0]["input_ids"], a[2]["input_ids"])


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_packed_rows_match_unpacked_examples_through_the_model(corpus, tok_dir, family):
    cfg = tiny.config(family, vocab_size=2000, max_position_embeddings=70,
                      pad_token_id=Tokenizer.load(tok_dir).pad_id)
    objective = "none" if family == "roberta" else "nsp"
    # Instances of at most 24 tokens packed into rows of 64.
    src = source(corpus, tok_dir, objective, batch=2, per_row=3, offset=cfg.position_offset,
                 instance_len=24)
    row = batches(src, 1)[0]
    assert row["segment_ids"].max() >= 2, "expected several examples per row"
    params = nn.unbox(init_params(cfg, "base", jax.random.key(0)))
    model = build_model(cfg, "base")
    packed = jax.jit(model.apply)({"params": params}, row["input_ids"], row["token_type_ids"], None,
                                  row["position_ids"], row["segment_ids"])["sequence_output"]
    for b in range(2):
        for e in range(1, row["segment_ids"][b].max() + 1):
            idx = np.flatnonzero(row["segment_ids"][b] == e)
            ids = row["input_ids"][b, idx][None]
            alone = jax.jit(model.apply)({"params": params}, ids, row["token_type_ids"][b, idx][None],
                                         np.ones_like(ids))["sequence_output"]
            np.testing.assert_allclose(packed[b, idx], alone[0], atol=2e-5)


def test_cache_is_reused(tok_dir, tmp_path, monkeypatch):
    tok = Tokenizer.load(tok_dir)
    first = cache.build(TRAIN[:2], tok, tok_dir, tmp_path, workers=1)
    monkeypatch.setattr(cache, "_tokenize_file", lambda *a: pytest.fail("re-tokenized a cached corpus"))
    second = cache.build(TRAIN[:2], tok, tok_dir, tmp_path, workers=1)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    assert first.num_documents == 2


def test_sentence_splitter_is_a_real_one(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Mr. Smith paid $3.50 for it. Dr. Watson agreed!\nIt was late.\n\nNew paragraph here.")
    assert cache.split_documents(f, "file") == [
        ["Mr. Smith paid $3.50 for it.", "Dr. Watson agreed!", "It was late.", "New paragraph here."]]
    assert len(cache.split_documents(f, "blank_line")) == 2
