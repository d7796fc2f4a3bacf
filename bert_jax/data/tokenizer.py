"""One tokenizer interface over the three families' schemes.

  wordpiece      BERT: BertNormalizer (cased/uncased, accent stripping, CJK splitting),
                 BertPreTokenizer, WordPiece                      (Hugging Face `tokenizers`)
  bpe            RoBERTa: byte-level BPE with GPT-2's pre-tokenizer (`tokenizers`)
  sentencepiece  ALBERT: a unigram model trained and stored by `sentencepiece`; encoded by
                 `tokenizers`' Unigram with ALBERT's normalisation (the pieces, scores and
                 normalisation map come from the `spiece.model` proto), which gives
                 offsets, word ids and fast batches like the other two.

Each is built the way `transformers` builds BertTokenizerFast / RobertaTokenizerFast /
AlbertTokenizer from the same files, so ids agree (tests check it on real text).
Special tokens are defined once, in SPECIALS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from bert_jax import paths
from bert_jax.data import textfile
from bert_jax.errors import BertJaxError

KINDS = ("wordpiece", "bpe", "sentencepiece")
TRUNCATION = ("longest_first", "only_first", "only_second")
META_FILE = "bert_jax_tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Specials:
    cls: str
    sep: str
    pad: str
    mask: str
    unk: str

    def all(self) -> list[str]:
        return [self.pad, self.unk, self.cls, self.sep, self.mask]


# The one definition of each family's special tokens.
SPECIALS = {
    "wordpiece": Specials(cls="[CLS]", sep="[SEP]", pad="[PAD]", mask="[MASK]", unk="[UNK]"),
    "bpe": Specials(cls="<s>", sep="</s>", pad="<pad>", mask="<mask>", unk="<unk>"),
    "sentencepiece": Specials(cls="[CLS]", sep="[SEP]", pad="<pad>", mask="[MASK]", unk="<unk>"),
}
FAMILY_KIND = {"bert": "wordpiece", "roberta": "bpe", "albert": "sentencepiece"}


class TokenizerError(BertJaxError, ValueError):
    """Tokenizer files are missing or unusable; the message names the file or folder."""


@dataclasses.dataclass
class Encoding:
    """One encoded text or pair. All lists have the same length.

    offsets are (start, end) character offsets into the text the token came from (the
    first or the second of a pair, as `sequence_ids` tells); special tokens get (0, 0).
    word_ids number the words of each text from 0; None for special tokens."""
    input_ids: list[int]
    token_type_ids: list[int]
    attention_mask: list[int]
    special_tokens_mask: list[int]
    word_ids: list[int | None]
    sequence_ids: list[int | None]
    offsets: list[tuple[int, int]]
    truncated: bool = False     # max_length cut tokens off

    def __len__(self):
        return len(self.input_ids)


class Tokenizer:
    """A loaded tokenizer. Build with `Tokenizer.load(folder)` or the `vocab` job."""

    def __init__(self, backend: HFTokenizer, kind: str, lowercase: bool,
                 extra_special_tokens: Sequence[str] = (), spiece_model: bytes | None = None):
        if kind not in KINDS:
            raise TokenizerError(f"kind={kind!r}: must be one of {KINDS}")
        self.backend, self.kind, self.lowercase = backend, kind, lowercase
        self.specials = SPECIALS[kind]
        self.spiece_model = spiece_model
        self.extra_special_tokens = tuple(extra_special_tokens)
        if self.extra_special_tokens:
            backend.add_special_tokens(list(self.extra_special_tokens))
        for t in self.specials.all():
            if backend.token_to_id(t) is None:
                raise TokenizerError(f"special token {t!r} is not in the {kind} vocabulary")
        self.cls_id, self.sep_id, self.pad_id, self.mask_id, self.unk_id = (
            backend.token_to_id(t) for t in (self.specials.cls, self.specials.sep, self.specials.pad,
                                             self.specials.mask, self.specials.unk))
        # Never masked, never a word. [UNK] is not among them: it stands for real text.
        self.special_ids = frozenset(
            backend.token_to_id(t) for t in [self.specials.cls, self.specials.sep,
                                             self.specials.pad, self.specials.mask]
            + list(self.extra_special_tokens))

    # ----------------------------------------------------------------- properties ----
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Stable hash of everything that decides the ids."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_to_id(self, t: str) -> int | None:
        return self.backend.token_to_id(t)

    # ------------------------------------------------------------------- encoding ----
    def _configure(self, max_length, truncation):
        if truncation not in TRUNCATION:
            raise TokenizerError(f"truncation={truncation!r}: must be one of {TRUNCATION}")
        if max_length is None:
            self.backend.no_truncation()
        else:
            self.backend.enable_truncation(max_length, strategy=truncation)

    def encode(self, text: str, pair: str | None = None, max_length: int | None = None,
               truncation: str = "longest_first") -> Encoding:
        """[CLS] text [SEP] (pair [SEP]), truncated to `max_length` tokens by `truncation`."""
        return self.encode_batch([text], None if pair is None else [pair], max_length, truncation)[0]

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     max_length: int | None = None, truncation: str = "longest_first") -> list[Encoding]:
        if max_length is not None:  # a huge text costs what max_length tokens of it can use
            texts = [textfile.cut(t, max_length * textfile.CHARS_PER_TOKEN) for t in texts]
            if pairs is not None:
                pairs = [textfile.cut(t, max_length * textfile.CHARS_PER_TOKEN) for t in pairs]
        done = self._long_pairs(texts, pairs, max_length) if pairs and max_length and truncation == "longest_first" \
            else {}
        self._configure(max_length, truncation)
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        try:
            rest = iter(self.backend.encode_batch([x for i, x in enumerate(inputs) if i not in done]))
            encs = [done[i] if i in done else next(rest) for i in range(len(inputs))]
        except Exception as e:  # the Rust back end raises a bare Exception
            if "Truncation" not in str(e):
                raise
            raise TokenizerError(
                f"truncation={truncation!r} with max_length={max_length}: {e} (the text it may "
                "not truncate is already longer than max_length)") from None
        return [_to_encoding(e, self.special_ids) for e in encs]

    def _long_pairs(self, texts: list[str], pairs: list[str], max_length: int) -> dict[int, tokenizers.Encoding]:
        """The library's own pair path (each side encoded alone, then truncated and joined by
        post_process) for the pairs with a side over 4 x max_length characters, each side
        first cut to what longest_first can keep of it. The library truncates a pair by
        building every combination of the two sides' overflowing windows: two sides of k
        windows cost k x k encodings (56 s for one 8,000-character pair at max_length 8).
        longest_first keeps min(n, max_length / 2) of the shorter side and fills the rest
        from the longer, so sides cut to min(n, max_length) tokens, the longer one keeping
        one more, give the same tokens."""
        long = [i for i, (a, b) in enumerate(zip(texts, pairs)) if max(len(a), len(b)) > 4 * max_length]
        if not long:
            return {}
        self.backend.no_truncation()
        processor, self.backend.post_processor = self.backend.post_processor, None
        try:  # post_process adjusts the offsets (RoBERTa's trimming): once, below, as the library's path does
            sides = self.backend.encode_batch([texts[i] for i in long] + [pairs[i] for i in long],
                                              add_special_tokens=False)
        finally:
            self.backend.post_processor = processor
        self._configure(max_length, "longest_first")
        out = {}
        for i, first, second in zip(long, sides[:len(long)], sides[len(long):]):
            n1, n2 = len(first.ids), len(second.ids)
            first.truncate(min(n1, max_length + (n1 > n2)))
            second.truncate(min(n2, max_length + (n2 > n1)))
            out[i] = self.backend.post_process(first, second)
        return out

    def encode_words(self, words: Sequence[str], max_length: int | None = None) -> Encoding:
        """[CLS] words [SEP] for pre-split words (NER): word_ids index `words`."""
        self._configure(max_length, "longest_first")
        if max_length is not None:
            words = [textfile.cut(w, max_length * textfile.CHARS_PER_TOKEN) for w in words]
        e = self.backend.encode(list(words), is_pretokenized=True)
        return _to_encoding(e, self.special_ids)

    def encode_windows(self, text: str, pair: str, max_length: int, overlap: int) -> list[Encoding]:
        """[CLS] text [SEP] window [SEP] for windows of `pair` that overlap by `overlap`
        tokens (sliding windows for extractive QA); `text` must fit."""
        self.backend.enable_truncation(max_length, stride=overlap, strategy="only_second")
        try:
            enc = self.backend.encode(text, pair)
        except Exception as e:
            raise TokenizerError(f"max_length={max_length}: {e}") from None
        return [_to_encoding(e, self.special_ids) for e in [enc] + list(enc.overflowing)]

    def tokenize_batch(self, texts: Sequence[str]) -> list[tuple[list[int], list[int | None]]]:
        """Ids and word ids of each text, no special tokens, no truncation (for building
        pretraining instances)."""
        self.backend.no_truncation()
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [(e.ids, e.word_ids) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    # -------------------------------------------------------------------- files ----
    def save(self, folder: str | pathlib.Path) -> None:
        """Write tokenizer.json, the scheme's native files, and the configs that
        `transformers` reads, so both our loader and AutoTokenizer load the folder."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.no_truncation()
        self.backend.save(str(folder / "tokenizer.json"))
        model = json.loads(self.backend.to_str())["model"]
        if self.kind == "wordpiece":
            vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
            (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
            cls = "BertTokenizer"
        elif self.kind == "bpe":
            (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
            merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
            (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
            cls = "RobertaTokenizer"
        else:
            if self.spiece_model is None:
                raise TokenizerError("this sentencepiece tokenizer has no spiece.model to save")
            (folder / "spiece.model").write_bytes(self.spiece_model)
            cls = "AlbertTokenizer"
        s = self.specials
        hf = dict(tokenizer_class=cls, do_lower_case=self.lowercase, cls_token=s.cls, sep_token=s.sep,
                  pad_token=s.pad, mask_token=s.mask, unk_token=s.unk,
                  model_max_length=512)
        if self.kind == "bpe":
            hf.update(bos_token=s.cls, eos_token=s.sep, add_prefix_space=False)
        if self.kind == "sentencepiece":
            hf.update(bos_token=s.cls, eos_token=s.sep, keep_accents=False)
        if self.extra_special_tokens:
            hf["additional_special_tokens"] = list(self.extra_special_tokens)
        (folder / "tokenizer_config.json").write_text(json.dumps(hf, indent=1))
        (folder / META_FILE).write_text(json.dumps(dict(
            kind=self.kind, lowercase=self.lowercase,
            extra_special_tokens=list(self.extra_special_tokens),
            fingerprint=self.fingerprint()), indent=1))

    @classmethod
    def load(cls, folder: str | pathlib.Path, *, lowercase: bool | None = None,
             extra_special_tokens: Sequence[str] = ()) -> "Tokenizer":
        """From a folder holding (first match wins): our tokenizer.json + meta;
        vocab.txt (WordPiece); vocab.json + merges.txt or GPT-2's encoder.json +
        vocab.bpe (BPE); spiece.model (SentencePiece); or a transformers tokenizer.json."""
        folder = pathlib.Path(folder)
        if not folder.is_dir():
            raise TokenizerError(f"tokenizer folder {folder} does not exist")
        for name in TOKENIZER_FILES:  # every file it may read resolves inside the folder
            if (folder / name).exists():
                try:
                    paths.inside(folder, name)
                except paths.OutsideFolderError as e:
                    raise TokenizerError(str(e)) from None
        meta_path, cfg_path = folder / META_FILE, folder / "tokenizer_config.json"
        hf_cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if lowercase is None:
            lowercase = hf_cfg.get("do_lower_case", True)
        extra = tuple(extra_special_tokens)
        if meta_path.exists() and (folder / "tokenizer.json").exists():
            meta = json.loads(meta_path.read_text())
            spm = (folder / "spiece.model").read_bytes() if meta["kind"] == "sentencepiece" else None
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            extra = tuple(dict.fromkeys(tuple(meta.get("extra_special_tokens", ())) + extra))
            return cls(backend, meta["kind"], meta["lowercase"], extra, spm)
        if (folder / "vocab.txt").exists():
            return cls(wordpiece_backend(_read_wordpiece_vocab(folder / "vocab.txt"), lowercase),
                       "wordpiece", lowercase, extra)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if (folder / vocab_name).exists() and (folder / merges_name).exists():
                return cls(bpe_backend(folder / vocab_name, folder / merges_name), "bpe", False, extra)
        if (folder / "spiece.model").exists():
            data = (folder / "spiece.model").read_bytes()
            return cls(sentencepiece_backend(data, lowercase, folder / "spiece.model"),
                       "sentencepiece", lowercase, extra, data)
        if (folder / "tokenizer.json").exists():
            backend = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            kind = {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "sentencepiece"}.get(
                json.loads(backend.to_str())["model"]["type"])
            if kind is None:
                raise TokenizerError(f"{folder / 'tokenizer.json'}: unsupported model type")
            return cls(backend, kind, lowercase, extra)
        raise TokenizerError(
            f"no tokenizer files in {folder}: expected vocab.txt (WordPiece), vocab.json + "
            "merges.txt or encoder.json + vocab.bpe (BPE), spiece.model (SentencePiece), or "
            "tokenizer.json")


def _to_encoding(e, special_ids) -> Encoding:
    # tokenizers flags only the tokens its post-processor adds; user-added special
    # tokens inside the text are special too (never masked, never a word).
    special = [int(m or i in special_ids) for i, m in zip(e.ids, e.special_tokens_mask)]
    return Encoding(input_ids=list(e.ids), token_type_ids=list(e.type_ids),
                    attention_mask=list(e.attention_mask),
                    special_tokens_mask=special, word_ids=list(e.word_ids),
                    sequence_ids=list(e.sequence_ids), offsets=[tuple(o) for o in e.offsets],
                    truncated=bool(e.overflowing))


# --------------------------------------------------------------------------------------
# Back ends, assembled as transformers assembles them from the same files.
# --------------------------------------------------------------------------------------
def _read_wordpiece_vocab(path: pathlib.Path) -> dict[str, int]:
    vocab = {}
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            tok = line.rstrip("\n")
            vocab.setdefault(tok, i)
    if not vocab:
        raise TokenizerError(f"{path}: empty vocabulary")
    return vocab


def wordpiece_backend(vocab: dict[str, int], lowercase: bool) -> HFTokenizer:
    s = SPECIALS["wordpiece"]
    tok = HFTokenizer(models.WordPiece(vocab, unk_token=s.unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = _template(s, vocab)
    tok.add_special_tokens(s.all())
    return tok


def _template(s: Specials, vocab) -> processors.TemplateProcessing:
    ids = [(s.cls, vocab[s.cls]), (s.sep, vocab[s.sep])]
    return processors.TemplateProcessing(single=f"{s.cls}:0 $A:0 {s.sep}:0",
                                         pair=f"{s.cls}:0 $A:0 {s.sep}:0 $B:1 {s.sep}:1",
                                         special_tokens=ids)


def bpe_backend(vocab_path: pathlib.Path, merges_path: pathlib.Path) -> HFTokenizer:
    s = SPECIALS["bpe"]
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    merges = []
    for line in merges_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    vocab = fairseq_layout(vocab)
    tok = HFTokenizer(models.BPE(vocab, merges, unk_token=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([s.cls, s.pad, s.sep, s.unk, s.mask])
    tok.post_processor = processors.RobertaProcessing(
        (s.sep, tok.token_to_id(s.sep)), (s.cls, tok.token_to_id(s.cls)),
        trim_offsets=True, add_prefix_space=False)
    return tok


def fairseq_layout(vocab: dict[str, int]) -> dict[str, int]:
    """RoBERTa's id layout (fairseq's dictionary): <s>=0, <pad>=1, </s>=2, <unk>=3, then
    the BPE tokens in their order, then <mask>. A vocabulary that already has <pad>
    (RoBERTa's own vocab.json, ours) is returned unchanged. GPT-2's encoder.json has no
    such tokens: its token i becomes id i + 4 and <mask> the last id (GPT-2's 50,257
    tokens give 50,262 ids). RoBERTa's released vocabulary orders the BPE tokens by
    fairseq's dict.txt instead, which matters only to reuse its weights, not to train."""
    s = SPECIALS["bpe"]
    if s.pad in vocab:
        return vocab
    head = [s.cls, s.pad, s.sep, s.unk]
    out = {t: i for i, t in enumerate(head)}
    for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if t not in out and t != s.mask:
            out[t] = len(out)
    out[s.mask] = len(out)
    return out


def sentencepiece_backend(model_bytes: bytes, lowercase: bool, path="spiece.model") -> HFTokenizer:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:  # protobuf raises its own DecodeError
        raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        raise TokenizerError(f"{path}: only unigram SentencePiece models are supported (ALBERT)")
    s = SPECIALS["sentencepiece"]
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=False))
    steps = [normalizers.Replace("``", '"'), normalizers.Replace("''", '"'),
             normalizers.NFKD(), normalizers.StripAccents()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = _template(s, {p: i for i, (p, _) in enumerate(vocab)})
    tok.add_special_tokens(s.all())
    return tok


# --------------------------------------------------------------------------------------
# Padding helper shared by jobs that batch encodings.
# --------------------------------------------------------------------------------------
def pad_batch(encodings: Sequence[Encoding], pad_id: int, length: int | None = None) -> dict[str, np.ndarray]:
    """Right-pad encodings to `length` (default: the longest) as int32 arrays."""
    n = length or max(len(e) for e in encodings)
    out = {k: np.zeros((len(encodings), n), np.int32)
           for k in ("input_ids", "token_type_ids", "attention_mask")}
    out["input_ids"][:] = pad_id
    for i, e in enumerate(encodings):
        m = len(e)
        out["input_ids"][i, :m] = e.input_ids
        out["token_type_ids"][i, :m] = e.token_type_ids
        out["attention_mask"][i, :m] = e.attention_mask
    return out


# Every file a tokenizer folder may hold (a Hugging Face model folder holds weights too).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "encoder.json", "vocab.bpe", "spiece.model",
                   "added_tokens.json", META_FILE)


def copy_files(src: str | pathlib.Path, dst: str | pathlib.Path) -> None:
    """Copy a tokenizer's files (and no others) into `dst`, for the folders that carry
    their tokenizer: workdirs, converted and exported checkpoints."""
    tok = Tokenizer.load(src)  # fail early on an unusable folder
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if tok.kind == "bpe" and not (src / "vocab.json").is_file():
        # GPT-2's encoder.json + vocab.bpe: write the RoBERTa layout they load as
        # (vocab.json, merges.txt, tokenizer.json), which transformers reads the same way.
        tok.save(dst)
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
