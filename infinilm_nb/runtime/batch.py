"""StepInput: the flattened description of one forward step, built on the host by the scheduler;
SamplingArrays: the sampler's per-sequence parameters of a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np


@dataclass
class StepInput:
    """One step's tokens for B sequences, prefill and decode mixed, flattened to T tokens.

    Sequence ``b`` owns tokens ``query_start_loc[b]:query_start_loc[b + 1]``; they are its last
    ``n_b`` positions, so ``context_lens[b]`` (its length in the cache after this step) ends them.
    A static cache is a paged cache with one block per sequence, so both use the same fields.
    """

    token_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    slot_mapping: np.ndarray  # int32 [T]: flat cache slot (block * block_size + offset), -1 = skip
    query_start_loc: np.ndarray  # int32 [B + 1]
    context_lens: np.ndarray  # int32 [B]
    block_tables: np.ndarray  # int32 [B, max_blocks]
    max_query_len: int | None = None  # host int: the most tokens one sequence brings (None: not known)

    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = (
        "token_ids", "positions", "slot_mapping", "query_start_loc", "context_lens", "block_tables",
    )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def last_token_index(self) -> np.ndarray:
        """int32 [B]: the flat index of each sequence's last token (the one whose logits we need)."""
        return (self.query_start_loc[1:] - 1).astype(np.int32)

    def to(self, backend: Any) -> "StepInput":
        """A copy whose arrays live on ``backend`` (one host-to-device copy per array field)."""
        arrays = {name: backend.asarray(getattr(self, name)) for name in self.ARRAY_FIELDS}
        return StepInput(**arrays, max_query_len=self.max_query_len)


class SamplingArrays(NamedTuple):
    """The sampler's parameters of a step, one row per sequence (see ``kernels.reference.sample``)."""

    temperatures: Any  # float32 [B]; 0 is greedy
    top_ks: Any  # int32 [B]; 0 keeps every token
    top_ps: Any  # float32 [B]; 1 keeps every token
    seeds: Any  # uint64 [B]

    def to(self, backend: Any) -> "SamplingArrays":
        """A copy whose arrays live on ``backend``."""
        return SamplingArrays(*(backend.asarray(array) for array in self))
