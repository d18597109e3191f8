"""Incremental detokenization for streaming: text grows token by token, a partial UTF-8 character is never
emitted, and text that may be the start of a stop string is held back until it is known not to be one."""

from __future__ import annotations

from collections.abc import Sequence

_INCOMPLETE = "\ufffd"  # what a byte-level decoder yields for a UTF-8 character cut short


class IncrementalDetokenizer:
    """Decodes a completion's ids a small window at a time. Only the ids since the last stable point are
    decoded together with the window before them (tokenizers such as SentencePiece render a token's leading
    space from its context), and the new text is the difference. Stop strings cut the text OpenAI-style: the
    completion ends just before the earliest one, which is never emitted."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # the window before `_read`, decoded again for context
        self._read = 0  # ids before this are already in `text`
        self._emitted = 0  # characters of `text` handed out by take()
        self.text = ""  # the stable completion text so far, cut at a stop string once one appears
        self.stopped = False  # a stop string appeared: no more text will be added
        self._finished = False  # generation ended: nothing is held back any more

    def add(self, token_id: int) -> None:
        """Append one generated id; its text joins `text` once it forms complete characters."""
        self._ids.append(token_id)
        if not (self.stopped or self._finished):
            self._decode_pending(final=False)

    def take(self) -> str:
        """The text that became safe to show since the last call."""
        end = len(self.text) - (0 if self.stopped or self._finished else self._held_back())
        if end <= self._emitted:
            return ""
        piece = self.text[self._emitted : end]
        self._emitted = end
        return piece

    def finish(self) -> str:
        """The rest of the text once generation ended, including any held-back or undecodable tail."""
        if not self.stopped:
            self._decode_pending(final=True)
        self._finished = True
        return self.take()

    def _decode_pending(self, final: bool) -> None:
        if self._read == len(self._ids):
            return
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if not final and window.endswith(_INCOMPLETE):
            return  # wait for the rest of the character's bytes
        self._prefix, self._read = self._read, len(self._ids)
        if len(window) > len(context):
            self._append(window[len(context) :])

    def _append(self, piece: str) -> None:
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper start of some stop string."""
        for n in range(min(self._longest_stop - 1, len(self.text) - self._emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
