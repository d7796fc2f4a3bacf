"""Fine-tuning building blocks: metrics against the libraries and official definitions,
tag-scheme conversion on real CoNLL-2003, valid-only decoding, QA windows and answer
recovery on real SQuAD, bad task files."""

import numpy as np
import pytest
from scipy import stats
from seqeval.metrics import f1_score as seqeval_f1
from sklearn import metrics as skm

from bert_jax.data.tokenizer import Tokenizer
from bert_jax.tasks import metrics, readers, squad, tagging


def test_classification_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    m = metrics.classification(y, p)
    assert m["accuracy"] == skm.accuracy_score(y, p)
    assert m["f1"] == skm.f1_score(y, p) and m["mcc"] == skm.matthews_corrcoef(y, p)
    constant = metrics.classification([0, 1, 1, 0], [1, 1, 1, 1])  # MCC undefined -> 0
    assert constant["mcc"] == 0.0 and constant["accuracy"] == 0.5


def test_regression_metrics_equal_scipy_with_ties():
    y = np.array([0.0, 1.0, 1.0, 2.5, 4.0, 5.0, 5.0])
    p = np.array([0.5, 0.9, 1.2, 2.0, 4.5, 4.5, 3.0])
    m = metrics.regression(y, p)
    assert m["pearson"] == pytest.approx(stats.pearsonr(p, y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(p, y)[0])
    assert metrics.regression(y, np.ones_like(y)) == {"pearson": 0.0, "spearman": 0.0}


def test_squad_metric_follows_the_official_definition():
    answers = {"a": ["Denver Broncos", "The Broncos"], "b": ["Santa Clara, California"], "c": ["1990"]}
    preds = {"a": "the broncos!", "b": "Santa Clara", "c": "in 1990s"}
    m = metrics.squad(preds, answers)
    # a: exact after normalisation; b: F1 = 2*(1*2/3)/(1+2/3) = 0.8; c: no overlap.
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert metrics.squad({"x": ""}, {"x": []})["exact_match"] == 100.0  # v2 no-answer
    assert metrics.squad({"x": "something"}, {"x": []})["f1"] == 0.0


def test_entity_f1_equals_seqeval():
    y = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    p = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "I-ORG", "O"]]
    assert metrics.entities(y, p)["f1"] == pytest.approx(seqeval_f1(y, p))
    assert metrics.entities(y, p)["precision"] == pytest.approx(2 / 3)
    yb = [tagging.iob2_to_bioes(s) for s in y]
    pb = [tagging.iob2_to_bioes(s) for s in p]
    assert metrics.entities(yb, pb, "BIOES")["f1"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def conll(shared_data):
    return readers.read_conll(shared_data / "ner/conll2003/valid.txt", "IOB2")


def test_conll_valid_counts(conll):
    assert len(conll) == 3250 and sum(len(s.words) for s in conll) == 51362


def test_tag_schemes_round_trip_on_real_conll(conll):
    spans = lambda tags: metrics.entities([tags], [tags])  # noqa: E731
    for s in conll:
        bioes = tagging.convert(s.tags, "IOB2", "BIOES")
        iob1 = tagging.convert(s.tags, "IOB2", "IOB1")
        assert tagging.is_valid(bioes, "BIOES") and tagging.is_valid(iob1, "IOB1")
        assert tagging.convert(bioes, "BIOES", "IOB2") == s.tags
        assert tagging.convert(iob1, "IOB1", "IOB2") == s.tags
        assert tagging.convert(tagging.convert(iob1, "IOB1", "BIOES"), "BIOES", "IOB1") == iob1
    # The same entities whatever the scheme (seqeval strict on BIOES vs IOB2).
    gold = [s.tags for s in conll]
    assert metrics.entities(gold, gold)["f1"] == 1.0
    shifted = [["O"] + t[:-1] for t in gold]
    assert metrics.entities(gold, shifted)["f1"] == pytest.approx(
        metrics.entities([tagging.iob2_to_bioes(t) for t in gold],
                         [tagging.iob2_to_bioes(t) for t in shifted], "BIOES")["f1"])
    del spans


@pytest.mark.parametrize("scheme", ["IOB1", "IOB2", "BIOES"])
def test_viterbi_only_emits_valid_sequences(scheme):
    labels = tagging.labels_for(["PER", "LOC", "ORG"], scheme)
    rng = np.random.default_rng(1)
    for _ in range(300):
        scores = rng.normal(size=(int(rng.integers(1, 12)), len(labels))) * 3
        tags = tagging.viterbi(scores, labels, scheme)
        assert tagging.is_valid(tags, scheme), tags
        greedy = [labels[i] for i in scores.argmax(1)]
        if tagging.is_valid(greedy, scheme):
            assert tags == greedy  # constraints change nothing when the argmax is valid


def test_bad_conll_tag_sequence_names_file_and_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP O\nBlackburn NNP I-NP I-PER\n")
    with pytest.raises(readers.TaskDataError, match=r"bad.txt:3: tag sequence .* not valid IOB2"):
        readers.read_conll(f, "IOB2")
    assert len(readers.read_conll(f, "IOB1")) == 2  # the same lines are valid IOB1


def test_bad_classification_rows_name_file_and_line(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("sentence\tlabel\ngood movie\t1\nbad\tmovie\t0\n")
    with pytest.raises(readers.TaskDataError, match=r"t.tsv:3: 3 columns, the header has 2"):
        readers.read_text_examples(f, "sentence", "label")
    f.write_text("sentence\tlabel\ngood movie\t1\nmeh\tmaybe\n")
    ex = readers.read_text_examples(f, "sentence", "label")
    with pytest.raises(readers.TaskDataError, match=r"t.tsv:3: unknown label 'maybe'"):
        readers.label_ids(ex, ["0", "1"])


def test_long_rows_are_cut_as_they_stream_and_csv_limits_are_named(tmp_path):
    """A huge field costs `max_chars`: a TSV field is capped while it streams, the label
    after it still read; a CSV field over the csv module's limit is an error naming the
    line (it was a csv.Error traceback); a CoNLL line is capped too."""
    long = "word " * 60_000
    (tmp_path / "t.tsv").write_text(f"sentence\tlabel\nshort\t0\n{long}\t1\n")
    ex = readers.read_text_examples(tmp_path / "t.tsv", "sentence", "label", max_chars=1000)
    assert [e.label for e in ex] == ["0", "1"] and ex[1].text == ("word " * 200).strip()
    assert ex[1].where.endswith("t.tsv:3")
    assert readers.read_text_examples(tmp_path / "t.tsv", "sentence", "label")[1].text == long.strip()
    (tmp_path / "t.csv").write_text(f"sentence,label\nshort,0\n{long},1\n")
    with pytest.raises(readers.TaskDataError, match=r"t.csv:3: field larger than field limit"):
        readers.read_text_examples(tmp_path / "t.csv", "sentence", "label")
    (tmp_path / "w.conll").write_text(f"EU B-ORG\n\n{'x' * 300_000} O\nrejects O\n")
    sents = readers.read_conll(tmp_path / "w.conll", labeled=False, max_chars=1000)
    assert [len(w) for s in sents for w in s.words] == [2, 1000, 7]


def test_real_glue_files_read(shared_data):
    sst = readers.read_text_examples(shared_data / "classification/sst2/dev.tsv", "sentence", "label")
    assert len(sst) == 872 and sorted({e.label for e in sst}) == ["0", "1"]
    mrpc = readers.read_text_examples(shared_data / "pair/mrpc/msr_paraphrase_train.txt", "#1 String",
                                    "Quality", "#2 String")
    assert len(mrpc) == 4076
    stsb = readers.read_text_examples(shared_data / "pair/stsb/dev.tsv", "sentence1", "score", "sentence2",
                                    regression=True)
    assert len(stsb) == 1500 and 0 <= min(e.label for e in stsb) and max(e.label for e in stsb) <= 5


def gold_logits(feats):
    F, L = feats.input_ids.shape
    s, e = np.full((F, L), -10.0), np.full((F, L), -10.0)
    s[np.arange(F), feats.start_positions] = 10.0
    e[np.arange(F), feats.end_positions] = 10.0
    return s, e


def test_windows_recover_answers_across_window_boundaries(shared_data):
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    words = [f"w{i}" for i in range(200)]
    ctx = " ".join(words)
    examples = []
    for k in range(0, 190, 7):  # answers at every offset, many crossing a boundary
        ans = " ".join(words[k:k + 4])
        examples.append(readers.QAExample(str(k), "where is it?", ctx, [ans], ctx.index(ans)))
    feats = squad.make_features(tok, examples, max_seq_length=48, doc_stride=16, max_query_length=8)
    assert feats.input_ids.shape[0] > 10 * len(examples) / len(examples)  # many windows each
    starts = feats.start_positions.reshape(-1)
    # Some windows cut an answer (label [CLS]) while another window holds it whole.
    assert (starts == 0).any()
    preds = squad.predict_answers(examples, feats, *gold_logits(feats))
    assert preds == {e.id: e.answers[0] for e in examples}


def test_windows_follow_bert_run_squad_on_long_real_contexts(shared_data):
    """Window starts are doc_stride tokens apart, each window as long as the room left by
    the question, the last one ending at the context's end -- run_squad.py's loop. (tokenizers
    0.23.2 cut the windows of 513-token contexts wrongly; this catches such a regression.)"""
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    examples = readers.read_squad(shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json")
    tok.backend.no_truncation()
    lengths = [len(e.ids) for e in tok.backend.encode_batch([e.context for e in examples], add_special_tokens=False)]
    long = [e for e, n in zip(examples, lengths) if n > 250]
    assert len(long) > 500
    feats = squad.make_features(tok, long, max_seq_length=384, doc_stride=128, max_query_length=64)
    tok.backend.no_truncation()
    for i, ex in enumerate(long):
        full = tok.backend.encode(ex.context, add_special_tokens=False).offsets
        q_len = min(len(tok.backend.encode(ex.question, add_special_tokens=False).ids), 64)
        window, C, starts, s = 384 - q_len - 3, len(full), [], 0
        while True:  # run_squad.py
            starts.append(s)
            if s + min(C - s, window) == C:
                break
            s += min(C - s, window, 128)
        got = [[o for o in feats.offsets[f] if o is not None] for f in np.flatnonzero(feats.example_index == i)]
        want = [(full[s], full[min(s + window, C) - 1]) for s in starts]
        assert [(w[0], w[-1]) for w in got] == want, (ex.id, C, window)


def test_squad_pipeline_on_gold_spans_scores_100(shared_data):
    tok = Tokenizer.load(shared_data / "vocab/bert-base-uncased")
    examples = readers.read_squad(shared_data / "qa/squad_v1.1_dev_rebuilt_minus_xquad.json", training=True)
    assert len(examples) == 9380
    feats = squad.make_features(tok, examples, max_seq_length=384, doc_stride=128, max_query_length=64)
    preds = squad.predict_answers(examples, feats, *gold_logits(feats), max_answer_length=1000)
    # Every answer that a span of whole tokens can express is recovered exactly. The
    # rebuilt dev set has a few answers that occur in their context only inside longer
    # words ('5' in 'Bowl 50'): those cannot be a token span, and are the only misses.
    expressible = [e for e in examples if readers._on_word_boundaries(e.context, e.answer_start, len(e.answers[0]))]
    assert len(examples) - len(expressible) < 40
    m = metrics.squad(preds, {e.id: e.answers for e in expressible})
    assert m["exact_match"] == 100.0 and m["f1"] == 100.0, m
    everything = metrics.squad(preds, {e.id: e.answers for e in examples})
    assert everything["exact_match"] > 99.5
