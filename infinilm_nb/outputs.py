"""What a request gives back: RequestOutput and its CompletionOutput (vLLM's shapes)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated completion.

    ``finish_reason`` is None while running, then "stop" (an end-of-sequence token, a stop token id or
    a stop string), "length" (max_tokens or the model's length) or "error" (see ``error``).
    """

    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    """The state of one request: its prompt and its completion so far (cumulative, not a delta)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
