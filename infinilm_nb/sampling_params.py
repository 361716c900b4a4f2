"""SamplingParams: how one request picks its tokens and when it stops (vLLM's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """Sampling and stopping options of one request, validated at construction.

    * ``max_tokens``: the most tokens to generate (>= 1).
    * ``temperature``: 0 is greedy (argmax); otherwise logits are divided by it (>= 0).
    * ``top_k``: keep the k most likely tokens; 0 or -1 turns it off.
    * ``top_p``: keep the smallest set of tokens whose probability reaches p, in (0, 1].
    * ``seed``: makes the request's sampled tokens reproducible; None draws one from the engine.
    * ``stop``: strings that end generation; the text is cut before the first one found.
    * ``stop_token_ids``: token ids that end generation (kept in ``token_ids``, not in the text).
    * ``ignore_eos``: keep generating past the model's end-of-sequence tokens.

    A bad value raises ``ValueError`` naming the field and the value.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 1, or 0 / -1 for off, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"SamplingParams.stop must be a non-empty string or a list of them, got {self.stop!r}")
        ids = list(self.stop_token_ids or [])
        if any(not _is_int(i) or i < 0 for i in ids):
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a list of integers >= 0, got {self.stop_token_ids!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"SamplingParams.ignore_eos must be True or False, got {self.ignore_eos!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.top_k = max(self.top_k, 0)
        self.stop_token_ids = ids
        self.stop_strings = stops
