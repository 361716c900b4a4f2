"""What each fusion of a decoder layer saves in a decode step, and what programmatic dependent launch
changes: the step timed with each fusion undone, and with PDL switched.

The fusions the runtime relies on, each undone by an op table that serves the fused op with the
unfused kernels (same op names, so the model and its CUDA graphs are unchanged):

- ``silu``: the gate-up GEMM with SiLU-mul in its epilogue -> the GEMM into ``[M, 2I]``, then silu_mul;
- ``residual``: o_proj and down adding the residual in their epilogue -> the GEMM, then an add;
- ``rope``: the QKV GEMM with RoPE and the K/V cache store in its epilogue -> the GEMM, rope, then store_kv.

``pdl on`` / ``pdl off`` switches the overlap of each kernel with the one before
(:func:`infinilm_nb.kernels.common.launch`; on unless ``INFINILM_NB_PDL=0``): the step's graph is
captured the other way. ``norm in gemm off`` runs the RMSNorm before QKV and gate-up as its own
kernel again (``gemm.NORM_IN_GEMM``); ``merge in partition off`` merges the split attention's
partials in the merge kernel again (``attention.MERGE_IN_PARTITION``); ``rope in gemm off`` runs RoPE
and the cache store in the rope_store_kv kernel after the QKV GEMM (``gemm.ROPE_IN_GEMM``); ``sampler
split off`` samples every row in one block (``sampling.MAX_PARTS = 1``). ``early
launch off`` keeps RMSNorm and the attention merge from letting the GEMM after them launch before they
exit (``common.LAUNCH_NEXT_EARLY``).

:func:`ablate` runs batch-1 decode on a checkpoint once per fusion undone, once with PDL switched, once
with the norms apart, once with the merge kernel, once with RoPE apart from QKV, once with the
sampler in one block and once without early launches (``bench/decode.py --ablate``);
:class:`UnfusedOps` is the op table.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

FUSIONS = ("silu", "residual", "rope")


class UnfusedOps:
    """``ops`` with the fusions named in ``undo`` served by their unfused kernels. Intermediates
    live in buffers kept per shape, made on first use (the decode graphs run each step eagerly once
    before capturing it, so no allocation happens inside a capture)."""

    def __init__(self, ops: Any, xp: Any, undo: tuple[str, ...]) -> None:
        unknown = set(undo) - set(FUSIONS)
        if unknown:
            raise ValueError(f"unknown fusion(s) {sorted(unknown)}: choose from {', '.join(FUSIONS)}")
        self._ops, self._xp, self._undo = ops, xp, set(undo)
        self._buffers: dict[tuple, Any] = {}

    def __getattr__(self, op: str) -> Any:
        return getattr(self._ops, op)

    def _buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        key = (shape, str(dtype))
        if key not in self._buffers:
            self._buffers[key] = self._xp.empty(shape, dtype=dtype)
        return self._buffers[key]

    def linear_silu_mul(self, x: Any, weight: Any, out: Any, norm_eps: float | None = None, normed: Any = None) -> Any:
        if "silu" not in self._undo:
            return self._ops.linear_silu_mul(x, weight, out, norm_eps=norm_eps, normed=normed)
        gate_up = self._buffer((x.shape[0], weight.shape[0]), out.dtype)
        self.linear(x, weight, gate_up, norm_eps=norm_eps, normed=normed)
        return self._ops.silu_mul(gate_up, out)

    def linear(self, x: Any, weight: Any, out: Any, bias: Any = None, residual: Any = None,
               norm_eps: float | None = None, normed: Any = None) -> Any:
        if residual is None or "residual" not in self._undo:
            return self._ops.linear(x, weight, out, bias=bias, residual=residual, norm_eps=norm_eps, normed=normed)
        product = self._buffer(tuple(out.shape), out.dtype)
        self._ops.linear(x, weight, product, bias=bias)
        return self._xp.add(product, residual, out=out)

    def linear_rope_store_kv(self, x: Any, weight: Any, out: Any, positions: Any, cos_sin: Any, k_cache: Any,
                             v_cache: Any, slot_mapping: Any, q_heads: int, kv_heads: int, bias: Any = None,
                             norm_eps: float | None = None, normed: Any = None) -> Any:
        if "rope" not in self._undo:
            return self._ops.linear_rope_store_kv(x, weight, out, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                                  q_heads, kv_heads, bias=bias, norm_eps=norm_eps, normed=normed)
        self._ops.linear(x, weight, out, bias=bias, norm_eps=norm_eps, normed=normed)
        from infinilm_nb.kernels.reference import qkv_heads

        q, k, v = qkv_heads(out, q_heads, kv_heads, k_cache.shape[-1])
        self._ops.rope(q, k, positions, cos_sin)
        self._ops.store_kv(k, v, k_cache, v_cache, slot_mapping)
        return out


@contextmanager
def _set(module: Any, name: str, value: Any, label: str) -> Iterator[str]:
    """Within the block, ``module.name`` is ``value`` (graphs captured inside keep what it builds);
    yields ``label``."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield label
    finally:
        setattr(module, name, before)


def pdl_switched() -> Any:
    """PDL the other way; yields ``"pdl on"`` or ``"pdl off"``, the way it is within the block."""
    from infinilm_nb.kernels import common

    return _set(common, "PDL", not common.PDL, "pdl off" if common.PDL else "pdl on")


def norms_apart() -> Any:
    """The decode GEMMs after an RMSNorm take its output from the norm kernel instead of normalising
    in their loop; yields ``"norm in gemm off"``."""
    from infinilm_nb.kernels import gemm

    return _set(gemm, "NORM_IN_GEMM", False, "norm in gemm off")


def merges_apart() -> Any:
    """The split attention's partials merged by the merge kernel, not by the last partition block;
    yields ``"merge in partition off"``."""
    from infinilm_nb.kernels import attention

    return _set(attention, "MERGE_IN_PARTITION", False, "merge in partition off")


def rope_apart() -> Any:
    """QKV's RoPE and cache store run in the rope_store_kv kernel after the GEMM, not in its
    epilogue; yields ``"rope in gemm off"``."""
    from infinilm_nb.kernels import gemm

    return _set(gemm, "ROPE_IN_GEMM", False, "rope in gemm off")


def sampler_in_one_block() -> Any:
    """Every sampler row in one block, not split over several; yields ``"sampler split off"``."""
    from infinilm_nb.kernels import sampling

    return _set(sampling, "MAX_PARTS", 1, "sampler split off")


def late_launches() -> Any:
    """No kernel lets the next launch before it exits; yields ``"early launch off"``."""
    from infinilm_nb.kernels import common

    return _set(common, "LAUNCH_NEXT_EARLY", False, "early launch off")


@contextmanager
def undone(backend: Any, fusions: tuple[str, ...]) -> Iterator[None]:
    """Within the block, ``backend.ops`` serves ``fusions`` unfused (for models built inside it)."""
    fused = backend.ops
    backend.ops = UnfusedOps(fused, backend.xp, fusions)
    try:
        yield
    finally:
        backend.ops = fused


def ablate(decode_step: Callable[[Any], float], make_llm: Callable[[], Any]) -> dict[str, float]:
    """Milliseconds of a batch-1 decode step (``decode_step(llm)``) with all fusions, then with each
    undone, then with PDL switched (key ``"pdl on"`` or ``"pdl off"``), then with the norms apart, the
    merge kernel, RoPE apart from QKV, the sampler in one block and no early launches, each on a
    fresh ``make_llm()`` whose model and graphs are built that way."""
    from infinilm_nb.backend import get_backend

    backend = get_backend("cuda")

    def timed() -> float:
        llm = make_llm()
        ms = decode_step(llm)
        llm.close()
        return ms

    times = {}
    for undo in ((), *((fusion,) for fusion in FUSIONS)):
        with undone(backend, undo):
            times[undo[0] if undo else "fused"] = timed()
    for switch in (pdl_switched, norms_apart, merges_apart, rope_apart, sampler_in_one_block, late_launches):
        with switch() as switched:
            times[switched] = timed()
    return times
