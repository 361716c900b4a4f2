"""Thin layers: each holds its backend arrays and calls ``backend.ops``; outputs are passed in.

The names follow tensor parallelism (a later issue): column-parallel layers (QKV, gate-up, the
embedding / lm_head by vocab) split their output rows over ranks and need no communication;
row-parallel layers (o_proj, down) split their input columns and all-reduce their output. Today
every layer holds the whole weight (tp = 1).
"""

from __future__ import annotations

from typing import Any


class Linear:
    """``out = x @ weight.T (+ bias) (+ residual)``; weight ``[N, K]`` as HF stores it."""

    def __init__(self, backend: Any, weight: Any, bias: Any = None) -> None:
        self.backend = backend
        self.weight = weight
        self.bias = bias

    def __call__(self, x: Any, out: Any, residual: Any = None) -> Any:
        return self.backend.ops.linear(x, self.weight, out, bias=self.bias, residual=residual)


class QKVParallelLinear(Linear):
    """The fused q | k | v projection ``[(Hq + 2 Hk) D, H]``; :meth:`split` views its output by head."""

    def __init__(self, backend: Any, weight: Any, bias: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(backend, weight, bias)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def split(self, qkv: Any) -> tuple[Any, Any, Any]:
        """``q [T, Hq, D]``, ``k [T, Hk, D]``, ``v [T, Hk, D]``: strided views into ``qkv [T, (Hq + 2 Hk) D]``."""
        heads = qkv.reshape(qkv.shape[0], self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q_end = self.num_heads
        k_end = q_end + self.num_kv_heads
        return heads[:, :q_end], heads[:, q_end:k_end], heads[:, k_end:]


class GateUpParallelLinear(Linear):
    """The fused gate | up projection ``[2 I, H]`` (gate rows first, as ``silu_mul`` reads them)."""


class RowParallelLinear(Linear):
    """o_proj and down_proj. Called with ``residual=out=`` the residual stream, it adds in place.

    Under tensor parallelism only rank 0 will pass the residual, and the all-reduce of ``out`` then
    sums the ranks' partial products onto it.
    """


class VocabParallelEmbedding:
    """Token embedding: rows ``vocab_start ..`` of the ``[V, H]`` table (all of it at tp = 1)."""

    def __init__(self, backend: Any, weight: Any, vocab_start: int = 0) -> None:
        self.backend = backend
        self.weight = weight
        self.vocab_start = vocab_start

    def __call__(self, ids: Any, out: Any) -> Any:
        return self.backend.ops.embedding(ids, self.weight, out, self.vocab_start)


class RMSNorm:
    """RMSNorm with weight ``[H]``."""

    def __init__(self, backend: Any, weight: Any, eps: float) -> None:
        self.backend = backend
        self.weight = weight
        self.eps = eps

    def __call__(self, x: Any, out: Any) -> Any:
        return self.backend.ops.rms_norm(x, self.weight, self.eps, out)
