"""Byte-level BPE tokenizer for the lab model, trained on the lab's own text."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from loraforge.lab.world import BOS, END_OF_TURN, EOS, PAD, ROLE_TOKENS, chat_template

SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train byte-level BPE and wrap it as a PreTrainedTokenizerFast with specials and chat template.

    No post-processor: plain `tokenizer(text)` adds no bos/eos, so rendering a conversation with the
    chat template (which writes bos itself) and tokenizing it gives no duplicate bos.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        model_max_length=1024,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template()
    return fast


def _chunks(texts: Iterable[str], size: int = 4096) -> Iterator[str]:
    for text in texts:
        for i in range(0, len(text), size):
            yield text[i : i + size]


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
