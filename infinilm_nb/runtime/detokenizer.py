"""Incremental detokenization: text as tokens arrive, never half a UTF-8 character."""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) end a UTF-8 character

# prompt tokens kept as context, so that decoders that drop a leading space see the real neighbours
PROMPT_CONTEXT = 5
# the window grows by the emitted tokens up to this length before its start moves up (a longer
# window costs the decoder more than the one decode a token it saves: 6 measured best)
MAX_WINDOW = 6


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text, a piece per token.

    The prefix-offset technique (as vLLM and transformers' TextStreamer): decode the window of tokens
    since ``prefix_offset`` and the part of it already emitted (up to ``read_offset``); the difference
    is new text, unless it ends in U+FFFD, which means a character's bytes are still arriving: then
    nothing is emitted and the window grows until the character is complete.

    After an emission the window keeps its start, so the next prefix is this window's text: one
    decode per token rather than two (this runs for every sequence of every step). Once the window
    holds ``MAX_WINDOW`` tokens its start moves up to the read offset.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._tokens = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._read_offset = len(self._tokens)
        self._prefix: str | None = None  # the text of the tokens before the read offset, once decoded
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self._tokens.append(int(token_id))
        if self._prefix is None:
            self._prefix = self._tokenizer.decode(self._tokens[: self._read_offset])
        prefix = self._prefix
        window = self._tokenizer.decode(self._tokens)
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return ""
        piece = window[len(prefix) :]
        if len(self._tokens) >= MAX_WINDOW:  # drop what no later window reads
            del self._tokens[: self._read_offset]
            self._prefix = None
        else:
            self._prefix = window
        self._read_offset = len(self._tokens)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end of the sequence: the held-back text, incomplete characters as U+FFFD."""
        prefix = self._tokenizer.decode(self._tokens[: self._read_offset])
        window = self._tokenizer.decode(self._tokens)
        piece = window[len(prefix) :]
        self._read_offset = len(self._tokens)
        self.text += piece
        return piece
