"""Every absl flag of every job, and their conversion to typed frozen options.

This is the only module that reads flag values. Each job calls its `define_*_flags()`
before `app.run`, then `*_options(argv)` to get a dataclass; library code never sees
absl. Tests parse flag files with a private FlagValues through the same functions.
"""

from __future__ import annotations

import dataclasses

from absl import flags

FLAGS = flags.FLAGS


class FlagError(ValueError):
    """A flag value is invalid; the message names the flag."""


def _unparsed(argv) -> None:
    if argv is not None and len(argv) > 1:
        raise FlagError(f"unexpected positional arguments {argv[1:]} (flags need --name=value)")


# ------------------------------------------------------------------------ vocab ----
@dataclasses.dataclass(frozen=True)
class VocabOptions:
    kind: str
    corpus: str
    vocab_size: int
    out: str
    lowercase: bool
    extra_special_tokens: tuple[str, ...]


def define_vocab_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_enum("kind", "wordpiece", ["wordpiece", "bpe", "sentencepiece"],
                      "Tokenizer scheme: wordpiece (BERT), bpe (RoBERTa), sentencepiece (ALBERT).", flag_values=fv)
    flags.DEFINE_string("corpus", None, "Comma-separated text files or globs.", flag_values=fv)
    flags.DEFINE_integer("vocab_size", 30522, "Vocabulary size, special tokens included.", lower_bound=1, flag_values=fv)
    flags.DEFINE_string("out", None, "Folder to write the tokenizer files to.", flag_values=fv)
    flags.DEFINE_bool("lowercase", True, "Lowercase (and strip accents) before tokenizing.", flag_values=fv)
    flags.DEFINE_list("extra_special_tokens", [], "User-added special tokens.", flag_values=fv)
    flags.mark_flags_as_required(["corpus", "out"], flag_values=fv)


def vocab_options(argv=None, fv: flags.FlagValues = FLAGS) -> VocabOptions:
    _unparsed(argv)
    return VocabOptions(kind=fv.kind, corpus=fv.corpus, vocab_size=fv.vocab_size, out=fv.out,
                        lowercase=fv.lowercase, extra_special_tokens=tuple(fv.extra_special_tokens))
