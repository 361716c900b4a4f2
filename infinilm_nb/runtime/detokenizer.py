"""Incremental detokenization: text as tokens arrive, never half a UTF-8 character."""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) end a UTF-8 character

# prompt tokens kept as context, so that decoders that drop a leading space see the real neighbours
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text, a piece per token.

    The prefix-offset technique (as vLLM and transformers' TextStreamer): decode the window of tokens
    since ``prefix_offset`` and the part of it already emitted (up to ``read_offset``); the difference
    is new text, unless it ends in U+FFFD, which means a character's bytes are still arriving: then
    nothing is emitted and the window grows until the character is complete.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._tokens = list(prompt_token_ids[-PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self._tokens.append(int(token_id))
        prefix = self._tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
        window = self._tokenizer.decode(self._tokens[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT):
            return ""
        piece = window[len(prefix) :]
        # drop what no later window reads, so that the token list stays short
        del self._tokens[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text += piece
        return piece

    def flush(self) -> str:
        """At the end of the sequence: the held-back text, incomplete characters as U+FFFD."""
        prefix = self._tokenizer.decode(self._tokens[self._prefix_offset : self._read_offset])
        window = self._tokenizer.decode(self._tokens[self._prefix_offset :])
        piece = window[len(prefix) :]
        self._read_offset = len(self._tokens)
        self.text += piece
        return piece
