"""One source of pretraining rows, for training, the held-out evaluation of a run and the
`heldout` job alike: text files -> the tokenized cache -> instances of one kind -> masked
rows (loader.PretrainSource). Two figures of the same text, kind, length and seed are
computed on the same rows whichever job computes them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Sequence

from absl import logging

from bert_jax.data import cache, instances, loader
from bert_jax.data.masking import MaskingConfig
from bert_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    kind: str                          # instances.KINDS: nsp | sop | none
    max_seq_length: int
    batch_size: int                    # global rows per batch
    seed: int                          # rows, pairs and masks
    masking: MaskingConfig
    position_offset: int = 0           # the model's first real position (RoBERTa: pad_id + 1)
    type_vocab_size: int = 2
    document_boundary: str = "file"    # file | blank_line
    sentence_splitter: str = "pysbd"
    short_seq_prob: float = 0.1
    on_the_fly: bool = False           # instances cut at each position (else prebuilt walks)
    max_examples_per_row: int = 1
    static_masks: int = 0


def make(files: Sequence[pathlib.Path], tok: Tokenizer, tok_dir, cache_dir, c: SourceConfig, *, flag: str,
         workers: int | None = None, process_index: int = 0, process_count: int = 1,
         barrier: Callable[[str], None] | None = None) -> loader.PretrainSource:
    """The rows of `files` (given by `flag`, which errors and warnings name). A kind that
    draws from other documents (NSP's random next segments) on text that is one document
    (one file, --document_boundary=file) takes its paragraphs (blank lines) as documents,
    with a warning; the other kinds keep the file whole."""
    build = lambda boundary: cache.build(files, tok, tok_dir, cache_dir, boundary, workers=workers,
                                         splitter=c.sentence_splitter, process_index=process_index,
                                         process_count=process_count, barrier=barrier)
    tc = build(c.document_boundary)  # with several processes, each prepares its share of the files
    if instances.KINDS[c.kind].needs_documents and tc.num_documents < 2 and c.document_boundary == "file":
        logging.warning("%s has one document; %s rows need several, so paragraphs (blank lines) are taken as "
                        "documents", flag, c.kind.upper())
        tc = build("blank_line")
    icfg = instances.InstanceConfig(c.max_seq_length, c.kind, c.short_seq_prob)
    inst = instances.OnTheFly(tc, icfg, c.seed) if c.on_the_fly else instances.build(tc, icfg, c.seed)
    pcfg = loader.PipelineConfig(max_seq_length=c.max_seq_length, objective=c.kind, global_batch_size=c.batch_size,
                                 seed=c.seed, position_offset=c.position_offset, type_vocab_size=c.type_vocab_size,
                                 max_examples_per_row=c.max_examples_per_row, static_masks=c.static_masks)
    specials = instances.SpecialIds(tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id)
    return loader.PretrainSource(tc, inst, pcfg, c.masking, specials, tok.vocab_size, process_index, process_count)
