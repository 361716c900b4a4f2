"""Sequence: one request's tokens and where the scheduler has got with them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted: its KV is to be (re)computed from token 0
    RUNNING = "running"  # holds blocks; computes its remaining prompt or one new token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request's prompt and generated tokens, its cache blocks and its progress.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache; the tokens after them are
    what the next steps compute. A preempted sequence drops its blocks and starts again from 0,
    recomputing its prompt and everything it generated so far.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append(self, token_id: int) -> None:
        """Add a generated token (its K/V are computed by the next step)."""
        self.token_ids.append(int(token_id))
