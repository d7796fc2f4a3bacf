"""Tokenizers: exact parity with transformers on real text, offsets, word ids, the vocab
job for all three kinds, and bad input."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import transformers

from bert_jax.data import corpus
from bert_jax.data import vocab as vocab_job
from bert_jax.data.tokenizer import Tokenizer, TokenizerError

NON_ASCII = ["Café déjà vu — naïve façade", "東京は日本の首都です。", "Zürich's Straße, ½ price!",
             "emoji 🙂 and tabs\tand  double  spaces", "Ærøskøbing ŁÓDŹ Ελληνικά русский"]


@pytest.fixture(scope="module")
def real_texts(shared_data):
    """Sentences of several real files: SST-2 dev, CoNLL-2003 valid, SQuAD questions and
    contexts."""
    with open(shared_data / "classification/sst2/dev.tsv", encoding="utf-8") as f:
        sst = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    conll, words = [], []
    for line in (shared_data / "ner/conll2003/valid.txt").read_text().splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if words:
                conll.append(" ".join(words))
            words = []
        else:
            words.append(line.split()[0])
    squad = json.loads((shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json").read_text())
    paras = [p for a in squad["data"] for p in a["paragraphs"]]
    questions = [q["question"] for p in paras for q in p["qas"]]
    contexts = [p["context"] for p in paras]
    return dict(sst=sst, conll=conll, questions=questions, contexts=contexts)


def assert_same(ours, theirs, offsets=True):
    assert ours.input_ids == theirs["input_ids"]
    if "token_type_ids" in theirs:
        assert ours.token_type_ids == theirs["token_type_ids"]
    if offsets:
        assert ours.offsets == [tuple(o) for o in theirs["offset_mapping"]]


def compare(ours, theirs, texts, pairs=None, max_length=None, truncation="longest_first"):
    encs = ours.encode_batch(texts, pairs, max_length=max_length, truncation=truncation)
    kw = dict(return_offsets_mapping=True, return_token_type_ids=True)
    if max_length:
        kw.update(max_length=max_length, truncation=truncation)
    hf = theirs(texts, pairs, **kw) if pairs else theirs(texts, **kw)
    for i, e in enumerate(encs):
        assert e.input_ids == hf["input_ids"][i], (texts[i], pairs and pairs[i])
        assert e.token_type_ids == hf["token_type_ids"][i]
        assert e.offsets == [tuple(o) for o in hf["offset_mapping"][i]], texts[i]


def test_wordpiece_matches_bert_tokenizer_fast(shared_data, real_texts):
    folder = shared_data / "vocab/bert-base-uncased"
    ours, theirs = Tokenizer.load(folder), transformers.BertTokenizerFast.from_pretrained(folder)
    t = real_texts
    compare(ours, theirs, t["sst"])
    compare(ours, theirs, t["conll"])
    compare(ours, theirs, t["contexts"] + NON_ASCII)
    n = min(len(t["questions"]), 2000)
    ctx_of = (t["contexts"] * 50)[:n]
    compare(ours, theirs, t["questions"][:n], ctx_of)
    compare(ours, theirs, t["questions"][:n], ctx_of, max_length=96, truncation="only_second")
    compare(ours, theirs, t["contexts"][:300], t["sst"][:300], max_length=64, truncation="longest_first")
    compare(ours, theirs, t["sst"][:300], t["contexts"][:300], max_length=96, truncation="only_second")
    compare(ours, theirs, t["contexts"][:300], t["sst"][:300], max_length=120, truncation="only_first")
    with pytest.raises(TokenizerError, match="truncation='only_second' with max_length=8"):
        ours.encode(t["contexts"][0], "short", max_length=8, truncation="only_second")


def test_wordpiece_matches_reference_ids(shared_data):
    ref = json.loads((shared_data / "reference/minilm_l6_v2_reference.json").read_text())
    ids = np.load(shared_data / "reference/minilm_l6_v2_reference.npz")["input_ids"]
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    for i, item in enumerate(ref["items"]):
        e = tok.encode(item["text_a"], item["text_b"])
        assert e.input_ids == [int(x) for x in ids[i][: len(e)]], item
        assert all(x == 0 for x in ids[i][len(e):])
        assert [tok.id_to_token(x) for x in e.input_ids] == item["tokens"]


def gpt2_folder_for_transformers(shared_data, tmp_path):
    """GPT-2's files renumbered by hand into RoBERTa's (fairseq's) layout: <s> <pad> </s>
    <unk> = 0..3, GPT-2 token i = i + 4, <mask> last."""
    d = tmp_path / "gpt2"
    d.mkdir()
    gpt2 = json.loads((shared_data / "vocab/gpt2-bpe/encoder.json").read_text(encoding="utf-8"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, **{t: i + 4 for t, i in gpt2.items()}}
    vocab["<mask>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    shutil.copy(shared_data / "vocab/gpt2-bpe/vocab.bpe", d / "merges.txt")
    return d


def test_gpt2_files_load_in_roberta_layout(shared_data, tmp_path):
    """RoBERTa's ids: <s>=0, <pad>=1, </s>=2, <unk>=3 (so real positions start at 2),
    GPT-2's token i at i + 4; and the folder we write for an export tokenizes the same in
    transformers' RobertaTokenizerFast."""
    ours = Tokenizer.load(shared_data / "vocab/gpt2-bpe")
    assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id, ours.mask_id) == (0, 1, 2, 3, 50261)
    gpt2 = json.loads((shared_data / "vocab/gpt2-bpe/encoder.json").read_text(encoding="utf-8"))
    assert all(ours.token_to_id(t) == i + 4 for t, i in gpt2.items())
    from bert_jax.model.config import variant
    assert variant("roberta-base").replace(pad_token_id=ours.pad_id).position_offset == 2
    ours.save(tmp_path / "export")
    theirs = transformers.RobertaTokenizerFast.from_pretrained(
        only(["vocab.json", "merges.txt", "tokenizer_config.json"], tmp_path / "export", tmp_path / "hf"))
    assert (theirs.pad_token_id, theirs.mask_token_id) == (1, 50261)
    compare(ours, theirs, ["Hello world, RoBERTa!", "naïve café — 東京"])


def test_bpe_matches_roberta_tokenizer_fast(shared_data, real_texts, tmp_path):
    ours = Tokenizer.load(shared_data / "vocab/gpt2-bpe")  # GPT-2's encoder.json + vocab.bpe
    theirs = transformers.RobertaTokenizerFast.from_pretrained(gpt2_folder_for_transformers(shared_data, tmp_path))
    assert ours.vocab_size == len(theirs)
    t = real_texts
    compare(ours, theirs, t["sst"] + NON_ASCII)
    compare(ours, theirs, t["conll"][:1000])
    compare(ours, theirs, t["contexts"][:500], None, max_length=128)
    compare(ours, theirs, t["questions"][:500], t["contexts"][:500], max_length=96, truncation="only_second")


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    """One tokenizer of each kind trained by the vocab job on part of ../shared/data/corpus
    (two sub-corpora: enough for real statistics, quick enough for CI)."""
    root = tmp_path_factory.mktemp("vocab")
    glob = f"{shared_data}/corpus/nltk_inaugural/*.txt,{shared_data}/corpus/nltk_webtext/*.txt"
    return {kind: (vocab_job.train(kind, glob, size, root / kind, lowercase=kind != "bpe"), root / kind)
            for kind, size in (("wordpiece", 4000), ("bpe", 3000), ("sentencepiece", 3000))}


def only(files, folder, tmp):
    tmp.mkdir()
    for f in files:
        shutil.copy(folder / f, tmp / f)
    return tmp


def test_trained_sentencepiece_matches_albert_tokenizer(trained, real_texts, tmp_path):
    tok, folder = trained["sentencepiece"]
    # transformers builds its tokenizer from spiece.model alone (no tokenizer.json).
    theirs = transformers.AlbertTokenizer.from_pretrained(
        only(["spiece.model", "tokenizer_config.json"], folder, tmp_path / "hf"))
    t = real_texts
    texts = t["sst"][:500] + t["conll"][:500] + t["contexts"][:300] + NON_ASCII
    for text in texts:
        assert tok.encode(text).input_ids == theirs(text)["input_ids"], text
    for q, c in zip(t["questions"][:200], t["contexts"][:200]):
        assert tok.encode(q, c, max_length=64, truncation="only_second").input_ids == \
            theirs(q, c, max_length=64, truncation="only_second")["input_ids"]
    # And with the sentencepiece library itself on the normalised text.
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    for text in texts[:400]:
        norm = tok.backend.normalizer.normalize_str(text)
        assert tok.encode(text).input_ids[1:-1] == sp.encode(" ".join(norm.split())), text


def test_trained_wordpiece_and_bpe_load_in_transformers(trained, real_texts, tmp_path):
    tok, folder = trained["wordpiece"]
    theirs = transformers.BertTokenizerFast.from_pretrained(only(["vocab.txt", "tokenizer_config.json"], folder, tmp_path / "wp"))
    compare(tok, theirs, real_texts["sst"][:500] + NON_ASCII)
    tok, folder = trained["bpe"]
    theirs = transformers.RobertaTokenizerFast.from_pretrained(
        only(["vocab.json", "merges.txt", "tokenizer_config.json"], folder, tmp_path / "bpe"))
    compare(tok, theirs, real_texts["sst"][:500] + NON_ASCII)
    assert (tok.cls_id, tok.pad_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3)  # fairseq order


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "sentencepiece"])
def test_offsets_point_at_the_right_characters(kind, trained, real_texts, shared_data):
    tok = trained[kind][0] if kind != "wordpiece" else Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    texts = real_texts["contexts"][:200] + real_texts["sst"][:200]
    checked = 0
    for text, e in zip(texts, tok.encode_batch(texts)):
        for tid, (s, t), special in zip(e.input_ids, e.offsets, e.special_tokens_mask):
            if special:
                assert (s, t) == (0, 0)
                continue
            piece = tok.decode([tid], skip_special_tokens=False).strip().lower()
            span = text[s:t].lower()
            assert 0 <= s <= t <= len(text) and span.strip() == span
            if s == t:  # a byte-level piece inside one multi-byte character
                assert kind == "bpe"
                continue
            if kind == "wordpiece" and tid != tok.unk_id:
                # The span is the token's text (accents stripped by normalisation).
                assert tok.backend.normalizer.normalize_str(span) == piece.removeprefix("##")
            elif kind == "bpe":
                assert piece.strip() == span.strip() or "\ufffd" in piece
            checked += 1
    assert checked > 1000


def test_word_ids_group_subtokens(shared_data):
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    text = "unflinchingly bleak and antidisestablishmentarianism ."
    e = tok.encode(text)
    words = text.split()
    for tid, w, (s, t) in zip(e.input_ids, e.word_ids, e.offsets):
        if w is None:
            continue
        assert text[s:t] in words[w]  # every sub-token lies inside its word
    assert e.word_ids.count(3) > 3  # the long word is split into several pieces
    pieces = [tok.id_to_token(i) for i, w in zip(e.input_ids, e.word_ids) if w == 3]
    assert pieces[0] == "anti" and all(p.startswith("##") for p in pieces[1:])


def test_cased_and_uncased_normalisation(tmp_path, shared_data):
    uncased = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    assert uncased.encode("Héllo WORLD").input_ids == uncased.encode("hello world").input_ids
    ids = uncased.encode("日本").input_ids  # CJK characters are split one by one
    assert [uncased.id_to_token(i) for i in ids[1:-1]] == ["日", "本"]
    cased = Tokenizer.load(shared_data / "vocab/bert-base-uncased", lowercase=False)
    assert cased.encode("Hello").input_ids != uncased.encode("Hello").input_ids


def test_user_added_special_tokens(shared_data):
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased", extra_special_tokens=["[ENT]"])
    e = tok.encode("the [ENT] barked")
    assert tok.token_to_id("[ENT]") == 30522 and 30522 in e.input_ids
    assert e.special_tokens_mask[e.input_ids.index(30522)] == 1


def test_missing_vocab_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer files in .*expected vocab.txt"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")


def test_bad_corpus_is_named(tmp_path):
    with pytest.raises(corpus.CorpusError, match="matches no file"):
        vocab_job.train("wordpiece", str(tmp_path / "missing*.txt"), 100, tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(corpus.CorpusError, match="every matched file is empty"):
        vocab_job.train("wordpiece", str(tmp_path / "empty.txt"), 100, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_too_small_for_alphabet(tmp_path):
    f = tmp_path / "alpha.txt"
    f.write_text(" ".join(chr(c) for c in range(0x4E00, 0x4E00 + 300)) + "\nabc def\n")
    with pytest.raises(TokenizerError, match=r"--vocab_size=50 .*alpha.txt"):
        vocab_job.train("wordpiece", str(f), 50, tmp_path / "wp")
    with pytest.raises(TokenizerError, match=r"--vocab_size=50"):
        vocab_job.train("sentencepiece", str(f), 50, tmp_path / "sp")
    with pytest.raises(TokenizerError, match=r"--vocab_size=100 .*256 byte"):
        vocab_job.train("bpe", str(f), 100, tmp_path / "bpe")
    assert not any((tmp_path / d).exists() for d in ("wp", "sp", "bpe"))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path, caplog):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait\nna\xefve text here\n".encode("latin-1") * 20)
    with caplog.at_level(logging.WARNING):
        tok = vocab_job.train("wordpiece", str(f), 120, tmp_path / "wp")
    assert "latin1.txt: replaced 40 undecodable byte(s)" in caplog.text
    assert tok.vocab_size <= 120


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "sentencepiece"])
def test_long_pairs_are_cut_before_the_pair_truncation_to_the_same_tokens(kind, trained, real_texts):
    """encode_batch cuts each long side of a pair after its first max_length tokens (at a word
    boundary) before the library's pair truncation, whose cost is the product of the two
    sides' window counts: the tokens must be the uncut pair's, every length mix."""
    tok = trained[kind][0]
    contexts = [c for c in real_texts["contexts"] if len(c) > 600][:12]
    short = real_texts["sst"][:12]
    pairs = list(zip(contexts, contexts[1:] + contexts[:1])) + list(zip(contexts, short)) + list(zip(short, contexts))
    for max_length in (8, 33, 128):
        ours = tok.encode_batch([a for a, _ in pairs], [b for _, b in pairs], max_length=max_length)
        tok.backend.enable_truncation(max_length, strategy="longest_first")
        theirs = tok.backend.encode_batch(pairs)  # the library on the uncut texts
        for (a, b), o, t in zip(pairs, ours, theirs):
            assert o.input_ids == t.ids and o.token_type_ids == t.type_ids and o.offsets == t.offsets, (max_length, a, b)
        assert any(len(a) > 4 * max_length for a, _ in pairs)  # the cut was exercised
