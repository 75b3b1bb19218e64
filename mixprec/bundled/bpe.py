"""Byte-level BPE tokenizer for the bundled model, and encoding of whole splits.

Byte-level BPE never meets an unknown character and decodes back to the exact source text, which
matters for code (indentation, tabs, non-ASCII identifiers). The tokenizer is trained on the train
split only so that the held-out splits stay unseen, and is wrapped as a
`PreTrainedTokenizerFast` so `AutoTokenizer.from_pretrained(folder)` loads it offline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["TokenizerConfig", "train_tokenizer", "encode_split"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerConfig:
    """BPE settings. `eos_token` doubles as the bos token and as the separator between files."""

    vocab_size: int = 4096
    min_frequency: int = 2
    eos_token: str = "<|endoftext|>"
    pad_token: str = "<|pad|>"

    def __post_init__(self) -> None:
        if not 300 <= self.vocab_size <= 65536:
            raise ValueError(f"vocab_size must be in [300, 65536] (256 bytes + merges), got {self.vocab_size}")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {self.min_frequency}")
        if self.eos_token == self.pad_token:
            raise ValueError("eos_token and pad_token must differ")


def train_tokenizer(texts: Sequence[str], config: TokenizerConfig) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it for transformers.

    `clean_up_tokenization_spaces=False` is essential: the default clean-up deletes the space
    before punctuation on decode, which breaks the exact round trip of source code.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[config.eos_token, config.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=config.eos_token,
        eos_token=config.eos_token,
        pad_token=config.pad_token,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    log.info("tokenizer: vocabulary %d from %d texts", len(wrapped), len(texts))
    return wrapped


def encode_split(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of all `texts` as one 1-D int32 tensor, with an eos token after every file.

    The eos after each file (including the last) marks document boundaries, so a window that
    crosses files shows the model where the context resets.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; train it with train_tokenizer()")
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    ids: list[int] = []
    for enc in encoded:
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)
