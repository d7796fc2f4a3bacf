"""Train a WordPiece, byte-level BPE or SentencePiece tokenizer on text files (the
`vocab` job is jobs/vocab.py).

The corpus is streamed line by line, never loaded whole. The folder written loads in our
`Tokenizer.load` and in transformers (BertTokenizerFast / RobertaTokenizerFast /
AlbertTokenizer) to the same ids.
"""

from __future__ import annotations

import io
import pathlib
import shutil
import tempfile
from typing import Iterator, Sequence

from absl import logging
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

from bert_jax.data import corpus
from bert_jax.data.tokenizer import (SPECIALS, Tokenizer, TokenizerError, bpe_backend,
                                sentencepiece_backend, wordpiece_backend)


def train(kind: str, corpus_glob: str | Sequence[str], vocab_size: int, out: str | pathlib.Path,
          lowercase: bool = True, extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """Train a tokenizer of `kind` and write it to `out` (replaced only on success)."""
    files = corpus.expand(corpus_glob)
    if next(iter(_lines(files)), None) is None:
        raise TokenizerError(f"{', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}: "
                             "the corpus has no text to learn a vocabulary from (blank lines only); nothing written")
    if kind == "wordpiece":
        tok = _train_wordpiece(files, vocab_size, lowercase)
    elif kind == "bpe":
        tok = _train_bpe(files, vocab_size)
        lowercase = False
    elif kind == "sentencepiece":
        tok, spiece = _train_sentencepiece(files, vocab_size, lowercase)
    else:
        raise TokenizerError(f"--kind={kind!r}: must be wordpiece, bpe or sentencepiece")
    tokenizer = Tokenizer(tok, kind, lowercase, extra_special_tokens,
                          spiece if kind == "sentencepiece" else None)

    # Write beside `out`, then move into place: a failed run leaves no partial folder.
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("wrote %s tokenizer, %d tokens, to %s", kind, tokenizer.vocab_size, out)
    return Tokenizer.load(out)


def _lines(files) -> Iterator[str]:
    return corpus.iter_lines(files)


def _check_size(kind, got: int, asked: int, files):
    if got > asked:
        raise TokenizerError(
            f"--vocab_size={asked} is too small for the alphabet of the corpus "
            f"({files[0]}{' ...' if len(files) > 1 else ''}): {kind} needs at least {got}")


def _train_wordpiece(files, vocab_size, lowercase) -> HFTokenizer:
    """tokenizers' WordPiece trainer numbers the `##c` continuation symbols in the order
    it meets them in a hash map, which differs between processes; merges that tie on
    frequency are then broken by those ids, so two trainings on the same text gave
    different vocabularies. Giving every `##c` of the corpus's alphabet up front, in
    code-point order, fixes their ids and so the whole vocabulary (as BERT's own vocab
    holds a `##c` for each character)."""
    s = SPECIALS["wordpiece"]
    tok = HFTokenizer(models.WordPiece(unk_token=s.unk))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    continuation = ["##" + c for c in sorted(_alphabet(files, tok.normalizer))]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=s.all() + continuation,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(_lines(files), trainer)
    vocab = tok.get_vocab()
    _check_size("wordpiece", len(vocab), vocab_size, files)
    return wordpiece_backend(vocab, lowercase)


def _alphabet(files, normalizer) -> set[str]:
    """The characters of the normalised corpus, whitespace excluded."""
    chars: set[str] = set()
    for line in _lines(files):
        chars.update(normalizer.normalize_str(line))
    return {c for c in chars if not c.isspace()}


def _train_bpe(files, vocab_size) -> HFTokenizer:
    s = SPECIALS["bpe"]
    if vocab_size < 256 + 5:
        raise TokenizerError(f"--vocab_size={vocab_size} is too small for byte-level BPE: "
                             "it needs the 256 byte symbols plus 5 special tokens")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # fairseq's dictionary order: <s>=0, <pad>=1, </s>=2, <unk>=3; <mask> right after.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=[s.cls, s.pad, s.sep, s.unk, s.mask],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_lines(files), trainer)
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        return bpe_backend(pathlib.Path(d) / "vocab.json", pathlib.Path(d) / "merges.txt")


def _train_sentencepiece(files, vocab_size, lowercase) -> tuple[HFTokenizer, bytes]:
    import sentencepiece as spm
    steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"'),
             normalizers.NFKD(), normalizers.StripAccents()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    norm = normalizers.Sequence(steps)  # what encoding applies before the model
    s = SPECIALS["sentencepiece"]
    model = io.BytesIO()
    spm.set_random_generator_seed(0)  # its sentence sampling on large corpora: reproducible
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=(norm.normalize_str(l) for l in _lines(files)),
            model_writer=model, vocab_size=vocab_size, model_type="unigram",
            pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece=s.pad, unk_piece=s.unk,
            control_symbols=[s.cls, s.sep, s.mask], input_sentence_size=2_000_000,
            shuffle_input_sentence=True, train_extremely_large_corpus=False, minloglevel=2,
            num_threads=16)  # fixed, not the machine's core count: same model everywhere
    except RuntimeError as e:
        raise TokenizerError(f"--vocab_size={vocab_size}: SentencePiece training on "
                             f"{files[0]}{' ...' if len(files) > 1 else ''} failed: {e}") from None
    return sentencepiece_backend(model.getvalue(), lowercase), model.getvalue()
