"""Thin layers: each holds its backend arrays and calls ``backend.ops``; outputs are passed in.

Under tensor parallelism each layer holds this rank's slice (see ``weights.rank_slices``):
column-parallel layers (QKV, gate-up) split their output rows over ranks and need no communication;
row-parallel layers (o_proj, down) split their input columns and all-reduce their output; the
embedding and the lm_head split the vocabulary, the first all-reducing its rows (each id is on one
rank, the others give zeros), the second all-gathering the logits. ``group`` is a
:class:`~infinilm_nb.runtime.distributed.CommunicationGroup`, or None on one rank.
"""

from __future__ import annotations

from typing import Any

from ..kernels import reference


class Linear:
    """``out = x @ weight.T (+ bias) (+ residual)``; weight ``[N, K]`` as HF stores it.

    With ``norm_eps`` x's rows are RMS-normalised first, in the GEMM where it can (``normed``, like
    x, is the scratch where it cannot): the RMSNorm before QKV and gate-up, whose weight is folded
    into theirs (:func:`~infinilm_nb.runtime.llama.fold_norm_weights`)."""

    def __init__(self, backend: Any, weight: Any, bias: Any = None) -> None:
        self.backend = backend
        self.weight = weight
        self.bias = bias

    def __call__(self, x: Any, out: Any, residual: Any = None, norm_eps: float | None = None, normed: Any = None) -> Any:
        return self.backend.ops.linear(
            x, self.weight, out, bias=self.bias, residual=residual, norm_eps=norm_eps, normed=normed
        )


class QKVParallelLinear(Linear):
    """The fused q | k | v projection ``[(Hq + 2 Hk) D, H]``; :meth:`split` views its output by head."""

    def __init__(self, backend: Any, weight: Any, bias: Any, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__(backend, weight, bias)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def split(self, qkv: Any) -> tuple[Any, Any, Any]:
        """``q [T, Hq, D]``, ``k [T, Hk, D]``, ``v [T, Hk, D]``: strided views into ``qkv [T, (Hq + 2 Hk) D]``."""
        return reference.qkv_heads(qkv, self.num_heads, self.num_kv_heads, self.head_dim)


class GateUpParallelLinear(Linear):
    """The fused gate | up projection ``[2 I, H]`` (gate rows first, as ``silu_mul`` reads them)."""


class RowParallelLinear(Linear):
    """o_proj and down_proj. Called with ``residual=out=`` the residual stream, it adds in place.

    Under tensor parallelism each rank multiplies its input columns; rank 0 alone adds the residual
    (and the bias) in the GEMM epilogue, the others overwrite ``out`` with their partial product, and
    the all-reduce of ``out`` sums them: ``residual + bias + sum of partials`` on every rank, with the
    residual add still fused and one all-reduce of ``[T, H]`` per layer half.
    """

    def __init__(self, backend: Any, weight: Any, bias: Any = None, group: Any = None) -> None:
        super().__init__(backend, weight, bias)
        self.group = group if group is not None and group.world_size > 1 else None

    def __call__(self, x: Any, out: Any, residual: Any = None) -> Any:
        if self.group is None:
            return super().__call__(x, out, residual)
        if self.group.info.rank == 0:
            self.backend.ops.linear(x, self.weight, out, bias=self.bias, residual=residual)
        else:
            self.backend.ops.linear(x, self.weight, out)
        return self.group.all_reduce(out)


class VocabParallelEmbedding:
    """Token embedding: rows ``vocab_start ..`` of the ``[V, H]`` table (all of it at tp = 1).

    Ids outside the shard give zero rows, so the all-reduce over ranks gives every row."""

    def __init__(self, backend: Any, weight: Any, vocab_start: int = 0, group: Any = None) -> None:
        self.backend = backend
        self.weight = weight
        self.vocab_start = vocab_start
        self.group = group if group is not None and group.world_size > 1 else None

    def __call__(self, ids: Any, out: Any) -> Any:
        self.backend.ops.embedding(ids, self.weight, out, self.vocab_start)
        return out if self.group is None else self.group.all_reduce(out)


class ParallelLMHead:
    """The lm_head over this rank's vocabulary rows ``[V / N, H]``, then every rank's logits gathered
    into ``[B, V]`` (rank r's columns ``r * V / N ..``), so that rank 0 samples from the whole vocabulary.

    The gather and reorder buffers are kept (:meth:`reserve`, or grown with the batch), so a step
    allocates nothing and a CUDA graph can capture it.
    """

    def __init__(self, backend: Any, weight: Any, group: Any = None) -> None:
        self.backend = backend
        self.weight = weight
        self.group = group if group is not None and group.world_size > 1 else None
        self._gathered: Any = None  # flat [N * B * V / N]: collectives need contiguous buffers
        self._logits: Any = None  # flat [B * V]

    def reserve(self, rows: int, dtype: Any) -> None:
        """Size the buffers for ``rows`` sequences (before capturing CUDA graphs: growing them later
        would free the arrays that graphs captured earlier write into)."""
        if self.group is None:
            return
        size = self.group.world_size * rows * self.weight.shape[0]
        if self._gathered is None or self._gathered.size < size:
            self._gathered = self._logits = None
            self._gathered = self.backend.xp.empty(size, dtype)
            self._logits = self.backend.xp.empty(size, dtype)

    def __call__(self, x: Any, out: Any) -> Any:
        """``x [B, H]`` -> this rank's logits in ``out [B, V / N]``; returns the ``[B, V]`` logits."""
        self.backend.ops.linear(x, self.weight, out)
        if self.group is None:
            return out
        ranks, (rows, columns) = self.group.world_size, out.shape
        size = ranks * out.size
        self.reserve(rows, out.dtype)
        gathered = self._gathered[:size].reshape(ranks, rows, columns)
        self.group.all_gather(out, gathered)
        logits = self._logits[:size].reshape(rows, ranks * columns)
        self.backend.xp.copyto(logits.reshape(rows, ranks, columns), gathered.transpose(1, 0, 2))
        return logits


class RMSNorm:
    """RMSNorm with weight ``[H]``. A decoder layer's input norm runs only for its hook: QKV and
    gate-up normalise their input themselves."""

    def __init__(self, backend: Any, weight: Any, eps: float) -> None:
        self.backend = backend
        self.weight = weight
        self.eps = eps

    def __call__(self, x: Any, out: Any) -> Any:
        return self.backend.ops.rms_norm(x, self.weight, self.eps, out)
