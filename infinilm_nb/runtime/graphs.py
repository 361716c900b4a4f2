"""Decode steps on persistent buffers, replayed as CUDA graphs: one graph per batch bucket.

A decode step (one new token per sequence) of ``B`` sequences runs in the smallest bucket of at least
``B`` rows (1, 2, 4, ..., ``max_num_seqs``). Each bucket owns its inputs: the
:class:`~infinilm_nb.runtime.batch.StepInput` arrays sized for the bucket (block tables as wide as
``max_model_len`` needs) and the sampler's per-row parameters, packed in one device buffer that a
host twin (pinned on a GPU) fills, so one copy moves them all. The model's forward
(:meth:`LlamaForCausalLM.run`) runs on views of the model's persistent activation buffers (all
buckets share them: they never run at once), and the sampler writes the bucket's token buffer.

On ``cuda`` that work is captured at start-up, once per bucket, into a CUDA graph on a non-blocking
stream, after one eager run that compiles and loads every kernel; a step then costs one host-to-device
copy, one graph launch on CuPy's current stream and one device-to-host copy of the tokens. Under tensor
parallelism the NCCL collectives (on CuPy's current stream) are captured with the rest: every rank
must build its :class:`DecodeGraphs` with the same arguments (captures run the collectives) and
replay the same bucket each step, followers calling :meth:`DecodeGraphs.decode` without sampling
parameters. Elsewhere (cpu, sim) there is no graph: the same body runs eagerly on the same buffers.

Padding rows (``B`` below the bucket) do harmless work that is thrown away: token 0 at position 0,
slot -1 (nothing is stored), context length 1 read through block 0 (a valid block), greedy sampling.

A step can also be launched without waiting for it (:meth:`DecodeGraphs.launch`, then
:meth:`DecodeGraphs.wait`), and the next step of the same sequences launched behind it before its
tokens reach the host: ``feed`` copies the tokens the previous step sampled, on the device, into the
next step's token ids (the engine's ``async_scheduling``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .batch import SamplingArrays, StepInput
from .llama import StepBuffers

# What a padding row holds in each input. Its block table row stays all zeros.
PAD = {
    "token_ids": 0,
    "positions": 0,
    "slot_mapping": -1,
    "context_lens": 1,
    "block_tables": 0,
    "temperatures": 0.0,
    "top_ks": 0,
    "top_ps": 1.0,
    "seeds": 0,
}


def decode_buckets(max_num_seqs: int) -> list[int]:
    """The batch sizes that get a graph: powers of two below ``max_num_seqs``, then ``max_num_seqs``."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    buckets = []
    size = 1
    while size < max_num_seqs:
        buckets.append(size)
        size *= 2
    return buckets + [max_num_seqs]


class PackedArrays:
    """Named arrays laid out in one device buffer and its host twin (pinned on a GPU), so that a
    single copy uploads all of them. ``host[name]`` and ``device[name]`` are views."""

    def __init__(self, backend: Any, fields: dict[str, tuple[tuple[int, ...], Any]]) -> None:
        self.backend = backend
        offsets, nbytes = {}, 0
        for name, (shape, dtype) in fields.items():
            offsets[name] = nbytes
            nbytes += -(-int(np.prod(shape)) * np.dtype(dtype).itemsize // 8) * 8  # 8-byte aligned (uint64 seeds)
        self.host_bytes = _host_buffer(backend, nbytes)
        self.device_bytes = backend.xp.empty(nbytes, dtype=np.uint8)

        def views(buffer: Any) -> dict[str, Any]:
            out = {}
            for name, (shape, dtype) in fields.items():
                size = int(np.prod(shape)) * np.dtype(dtype).itemsize
                out[name] = buffer[offsets[name] : offsets[name] + size].view(np.dtype(dtype)).reshape(shape)
            return out

        self.host = views(self.host_bytes)
        self.device = views(self.device_bytes)

    def upload(self) -> None:
        """Copy the host twin to the device on CuPy's current stream (asynchronous from pinned memory)."""
        if self.backend.on_gpu:
            import cupy

            self.device_bytes.set(self.host_bytes, stream=cupy.cuda.get_current_stream())
        else:
            self.device_bytes[...] = self.host_bytes


def _host_buffer(backend: Any, nbytes: int) -> np.ndarray:
    """``nbytes`` of host memory as a uint8 array: page-locked on a GPU, so copies from it are asynchronous."""
    if not backend.on_gpu:
        return np.zeros(nbytes, dtype=np.uint8)
    import cupy

    return np.frombuffer(cupy.cuda.alloc_pinned_memory(nbytes), dtype=np.uint8, count=nbytes)


@dataclass
class Launched:
    """A decode step launched and not yet waited for: its bucket, its rows, and (on a GPU) the event
    recorded once its tokens are on their way to ``host_tokens``."""

    bucket: "_Bucket"
    rows: int
    host_tokens: np.ndarray
    done: Any = None


@dataclass
class _Bucket:
    """One bucket's persistent inputs, activation views, token buffers and (on cuda) graph."""

    inputs: PackedArrays
    step: StepInput  # device views into ``inputs``
    sampling: SamplingArrays  # device views into ``inputs``
    buffers: StepBuffers
    tokens: Any  # int32 [size] on the device
    host_tokens: tuple[np.ndarray, np.ndarray]  # int32 [size] each, pinned on a GPU; steps alternate
    graph: Any = None
    uploaded: Any = None  # on a GPU: the event after the last upload, before the host twin is rewritten
    launches: int = 0
    logits: Any = None  # what the model's run returns: [size, vocab] (gathered over ranks under tp)
    rows: int = 0  # rows and block-table columns the last step wrote (all else is padding)
    width: int = 0


class DecodeGraphs:
    """Decode steps of up to ``max_num_seqs`` sequences on persistent buffers, as CUDA graphs on cuda.

    ``model`` is a :class:`~infinilm_nb.runtime.llama.LlamaForCausalLM` and ``cache`` its KV cache;
    ``max_model_len`` sets the block-table width. Building it on cuda captures every bucket (start-up
    cost: one eager step and one capture per bucket). :meth:`fits` says whether a scheduled step can
    run here; :meth:`decode` runs it and returns the sampled tokens.
    """

    def __init__(self, model: Any, cache: Any, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.cache = cache
        self.backend = model.backend
        self.buckets = decode_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // cache.block_size)
        model.reserve_buffers(self.buckets[-1], self.buckets[-1], self.max_blocks * cache.block_size)
        self._buckets = {size: self._make_bucket(size) for size in self.buckets}
        self.last_logits: Any = None  # the logits of the last decode's rows (activation dtype, reused)
        if self.backend.on_gpu:
            self._capture_all()

    @property
    def captured(self) -> bool:
        """Whether every bucket replays a CUDA graph (on cuda; elsewhere they run eagerly)."""
        return all(bucket.graph is not None for bucket in self._buckets.values())

    def fits(self, step: StepInput) -> bool:
        """Whether the host ``step`` runs here: one token per sequence, at most ``max_num_seqs``
        sequences, block tables within ``max_model_len``, and no hooks on the model (they need eager steps)."""
        return (
            step.num_tokens == step.num_seqs <= self.buckets[-1]
            and step.block_tables.shape[1] <= self.max_blocks
            and not self.model.hooks
        )

    def decode(self, step: StepInput, sampling: SamplingArrays | None = None) -> np.ndarray:
        """Run the decode ``step`` (host arrays; check :meth:`fits` first) and sample with ``sampling``
        (host arrays, one row per sequence; None: greedy). Returns the int32 tokens on the host."""
        return self.wait(self.launch(step, sampling))

    def launch(self, step: StepInput, sampling: SamplingArrays | None = None, feed: Launched | None = None) -> Launched:
        """Start the decode ``step`` on CuPy's current stream without waiting for it (as :meth:`decode`).

        ``feed``: a step of the same rows launched before, whose sampled tokens become this step's token
        ids on the device (``step.token_ids`` is then ignored): the next step of the same sequences can
        start before the previous one's tokens reach the host.
        """
        n = step.num_seqs
        bucket = self._buckets[self.bucket_size(n)]
        if feed is not None and (feed.bucket is not bucket or feed.rows != n):
            raise ValueError(f"launch: feed must be a launched step of the same {n} rows, got one of {feed.rows}")
        if bucket.uploaded is not None:
            bucket.uploaded.synchronize()  # the last upload has read the host twin we rewrite
        self._fill(bucket, step, sampling)
        bucket.inputs.upload()
        if self.backend.on_gpu:
            import cupy

            bucket.uploaded = cupy.cuda.Event(disable_timing=True)
            bucket.uploaded.record()
        if feed is not None:
            bucket.inputs.device["token_ids"][:n] = bucket.tokens[:n]  # after the upload, in stream order
        if bucket.graph is not None:
            bucket.graph.launch()  # on CuPy's current stream, after the upload
        else:
            self._body(bucket)
        self.last_logits = bucket.logits[:n]
        host_tokens = bucket.host_tokens[bucket.launches % 2]  # the previous launch's may still be read
        bucket.launches += 1
        return Launched(bucket, n, host_tokens, self._start_download(bucket, host_tokens))

    def wait(self, launched: Launched) -> np.ndarray:
        """The tokens of a launched step on the host (int32 ``[rows]``), once it is done."""
        if launched.done is not None:
            launched.done.synchronize()
        return launched.host_tokens[: launched.rows].copy()

    def release(self) -> None:
        """Free every captured graph once the device is idle; steps then run eagerly. Under tensor
        parallelism this comes before the NCCL communicator is freed: NCCL waits, forever, for the
        graphs that hold its collectives to go first."""
        if self.backend.on_gpu:
            self.backend.synchronize()
        for bucket in self._buckets.values():
            bucket.graph = None

    def bucket_size(self, num_seqs: int) -> int:
        """The rows of the bucket that runs ``num_seqs`` sequences."""
        return next(size for size in self.buckets if size >= num_seqs)

    def replay(self, num_seqs: int) -> None:
        """Launch the graph of ``num_seqs``'s bucket again on its current inputs, without waiting (for
        timing: it stores the same K and V again). Only on cuda."""
        graph = self._buckets[self.bucket_size(num_seqs)].graph
        if graph is None:
            raise RuntimeError("replay: no CUDA graph was captured (the backend is not cuda)")
        graph.launch()

    def _make_bucket(self, size: int) -> _Bucket:
        layout = {
            "token_ids": ((size,), np.int32),
            "positions": ((size,), np.int32),
            "slot_mapping": ((size,), np.int32),
            "query_start_loc": ((size + 1,), np.int32),
            "context_lens": ((size,), np.int32),
            "block_tables": ((size, self.max_blocks), np.int32),
            "temperatures": ((size,), np.float32),
            "top_ks": ((size,), np.int32),
            "top_ps": ((size,), np.float32),
            "seeds": ((size,), np.uint64),
        }
        inputs = PackedArrays(self.backend, layout)
        for name, value in PAD.items():
            inputs.host[name][...] = value
        inputs.host["query_start_loc"][...] = np.arange(size + 1)  # one token per row, always
        device = inputs.device
        tokens = self.backend.xp.zeros(size, dtype=np.int32)
        host_tokens = tuple(_host_buffer(self.backend, 4 * size).view(np.int32) for _ in range(2))
        return _Bucket(
            inputs=inputs,
            step=StepInput(**{name: device[name] for name in StepInput.ARRAY_FIELDS}, max_query_len=1),
            sampling=SamplingArrays(**{name: device[name] for name in SamplingArrays._fields}),
            buffers=self.model.activations.view(size, size, self.max_blocks * self.cache.block_size),
            tokens=tokens,
            host_tokens=host_tokens,
        )

    def _body(self, bucket: _Bucket) -> None:
        """The work of one decode step on the bucket's buffers: what the graph holds."""
        bucket.logits = self.model.run(bucket.step, self.cache, bucket.buffers)
        self.backend.ops.sample(bucket.logits, *bucket.sampling, bucket.tokens)

    def _fill(self, bucket: _Bucket, step: StepInput, sampling: SamplingArrays | None) -> None:
        """Write the step's rows into the bucket's host inputs. Rows past them hold padding and block
        table columns past each row's blocks zeros: only what the previous step left is reset."""
        n, width = step.num_seqs, step.block_tables.shape[1]
        host = bucket.inputs.host
        rows = {
            "token_ids": step.token_ids,
            "positions": step.positions,
            "slot_mapping": step.slot_mapping,
            "context_lens": step.context_lens,
        }
        if sampling is not None:
            rows.update(sampling._asdict())
        else:
            for name in SamplingArrays._fields:
                host[name][...] = PAD[name]
        stale = slice(n, max(n, bucket.rows))
        for name, values in rows.items():
            host[name][:n] = values
            host[name][stale] = PAD[name]
        tables = host["block_tables"]
        tables[:n, :width] = step.block_tables
        tables[:n, width : max(width, bucket.width)] = 0
        tables[stale] = 0
        bucket.rows, bucket.width = n, width

    def _start_download(self, bucket: _Bucket, host_tokens: np.ndarray) -> Any:
        """Copy the bucket's sampled tokens into ``host_tokens`` behind the step; on a GPU return
        the event that marks the copy done (None elsewhere: the copy is made at once)."""
        if not self.backend.on_gpu:
            host_tokens[...] = bucket.tokens
            return None
        import cupy

        stream = cupy.cuda.get_current_stream()
        # blocking=False: CuPy's default waits for the stream, which would make every launch wait for its step
        bucket.tokens.get(stream=stream, out=host_tokens, blocking=False)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(stream)
        return done

    def _capture_all(self) -> None:
        """Capture every bucket, the largest first (a buffer a layer grows with the batch then reaches
        its full size in the first eager run, before any capture)."""
        import cupy

        cupy.cuda.Device().synchronize()  # the weights and the cache were written on other streams
        stream = cupy.cuda.Stream(non_blocking=True)
        for size in reversed(self.buckets):
            bucket = self._buckets[size]
            with stream:
                bucket.inputs.upload()  # padding only: the warm-up and the capture store nothing
                self._body(bucket)  # compiles and loads every kernel of this shape outside the capture
                stream.synchronize()
                stream.begin_capture()
                try:
                    self._body(bucket)
                finally:
                    bucket.graph = stream.end_capture()  # also after an error: the stream must leave capture
        stream.synchronize()
