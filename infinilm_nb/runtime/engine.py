"""LLMEngine: requests in, one scheduled step at a time through the model and the sampler, outputs out."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..kernels import reference
from ..outputs import CompletionOutput, RequestOutput
from ..sampling_params import SamplingParams
from .batch import SamplingArrays, StepInput
from .detokenizer import IncrementalDetokenizer
from .follower import call_on_every_rank
from .graphs import DecodeGraphs, Launched
from .scheduler import ScheduledStep, Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer

def step_seeds(request_seeds: np.ndarray, num_generated: np.ndarray) -> np.ndarray:
    """The sampler's uint64 seed for each request's next token: the ``num_generated``-th number of
    the request seed's splitmix stream, so a seeded request gives the same tokens in any batch,
    preempted or not."""
    return reference.splitmix_stream(request_seeds, num_generated)


@dataclass(eq=False)
class _Request:
    """The engine's view of a request: its sequence and the text made of it so far."""

    seq: Sequence
    prompt: str | None
    seed: int
    detokenizer: IncrementalDetokenizer
    holdback: int  # characters withheld from unfinished outputs: a stop string may be starting there
    text: str = ""
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    # the outputs' copy of the prompt, made once and shared by every output of the request
    prompt_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.seq.prompt_token_ids)

    def output(self) -> RequestOutput:
        finished = self.finish_reason is not None
        text = self.text if finished or not self.holdback else self.text[: max(len(self.text) - self.holdback, 0)]
        completion = CompletionOutput(
            text=text,
            token_ids=self.seq.output_token_ids,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            error=self.error,
        )
        return RequestOutput(self.seq.request_id, self.prompt, self.prompt_token_ids, [completion], finished)


class LLMEngine:
    """Runs requests to completion, one continuous-batching step per :meth:`step`.

    A step: the scheduler's host :class:`StepInput` -> one copy to the backend -> ``model.forward`` ->
    the backend's ``sample`` op (per-row temperature, top-k, top-p and seed) -> tokens to the host ->
    append, detokenize incrementally, check the stop conditions. With ``graphs``, the decode steps
    that fit them run there instead (:class:`~infinilm_nb.runtime.graphs.DecodeGraphs`: persistent
    buffers, a CUDA graph per batch bucket on cuda).

    ``async_scheduling`` (one rank, with graphs): a decode step whose sequences go on is followed by
    the next one launched behind it, before its tokens come back: the next step's token ids come from
    the device (:meth:`~infinilm_nb.runtime.graphs.DecodeGraphs.launch` with ``feed``), so the GPU
    runs it while the host appends, detokenizes and checks the stop conditions of the first. A
    sequence that stops in between has one token computed in vain, thrown away.
    """

    def __init__(
        self,
        model: Any,
        cache: Any,
        tokenizer: Tokenizer,
        backend: Any,
        scheduler: Scheduler,
        max_model_len: int,
        eos_token_ids: set[int],
        seed: int = 0,
        graphs: DecodeGraphs | None = None,
        group: Any = None,
        async_scheduling: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.backend = backend
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.vocab_size = int(model.config.vocab_size)
        self.graphs = graphs
        self.group = group  # under tensor parallelism: rank 0's engine runs each step on every rank
        self._rng = np.random.default_rng(seed)
        self._requests: dict[str, _Request] = {}
        self._failed: list[RequestOutput] = []
        # a decode step launched ahead and not yet collected: (its schedule, its launch)
        self._ahead: tuple[ScheduledStep, Launched] | None = None
        self.async_scheduling = async_scheduling and graphs is not None and (group is None or group.world_size == 1)
        self.steps_ahead = 0  # decode steps launched before the previous one's tokens came back
        self._stream: Any = nullcontext()
        if backend.on_gpu:
            # Every step runs on the engine's own non-blocking stream, never on the legacy default
            # stream, whose implicit synchronisation with other streams does not mix with NCCL's own
            # streams under CUDA graphs. The weights and the cache were written on the default
            # stream: wait for them once.
            backend.xp.cuda.Device().synchronize()
            self._stream = backend.xp.cuda.Stream(non_blocking=True)

    def tokenize_prompt(self, prompt: str | dict[str, Any]) -> tuple[str | None, list[int]]:
        """``(text, token ids)`` of a prompt: a string, or ``{"prompt_token_ids": [...]}``.

        Raises ``ValueError`` for an empty prompt, a token id outside the vocabulary or another type.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = [int(i) for i in prompt["prompt_token_ids"]]
            text = prompt.get("prompt")
        else:
            raise ValueError(f'a prompt is a string or {{"prompt_token_ids": [...]}}, got {type(prompt).__name__}')
        if not ids:
            raise ValueError(f"prompt is empty (no tokens): {prompt!r}")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return text, ids

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Queue a tokenized request. One longer than ``max_model_len`` is not run: it finishes at the
        next :meth:`step` with finish_reason "error" and a message, and the others go on. An empty
        prompt raises ``ValueError`` here (a step of it would fail every running request)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if not prompt_token_ids:
            raise ValueError(f"prompt is empty (no tokens) in request {request_id!r}")
        if len(prompt_token_ids) > self.max_model_len:
            message = (
                f"prompt has {len(prompt_token_ids)} tokens, more than max_model_len={self.max_model_len}; "
                "shorten it or raise max_model_len"
            )
            completion = CompletionOutput(finish_reason="error", error=message)
            self._failed.append(RequestOutput(request_id, prompt, list(prompt_token_ids), [completion], True))
            return
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 1 << 63))
        self._requests[request_id] = _Request(
            seq=Sequence(request_id, prompt_token_ids, params),
            prompt=prompt,
            seed=seed % (1 << 64),  # a uint64: negative or wide seeds wrap
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids),
            holdback=max((len(s) for s in params.stop_strings), default=1) - 1,
        )
        self.scheduler.add(self._requests[request_id].seq)

    def abort(self, request_id: str) -> None:
        """Drop a request (unknown or finished ids are ignored)."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq)

    def has_unfinished(self) -> bool:
        return bool(self._requests or self._failed)

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one step; the outputs of the requests that got a token or finished in it (with
        ``finished_only``, of those that finished: no output is built per token for callers that do
        not stream)."""
        outputs, self._failed = self._failed, []
        if self._ahead is not None:
            scheduled, launched = self._ahead
        else:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return outputs
            if not (self.async_scheduling and self.graphs.fits(scheduled.step)):
                tokens = call_on_every_rank(self.group, self, "execute", scheduled.step,
                                            sampling=self._sampling(scheduled))
                return outputs + self._collect(scheduled, tokens, finished_only)
            with self._stream:
                launched = self.graphs.launch(scheduled.step, self._sampling(scheduled))
        self._ahead = self._launch_ahead(scheduled, launched) if self.async_scheduling else None
        with self._stream:
            tokens = self.graphs.wait(launched)
        return outputs + self._collect(scheduled, tokens, finished_only)

    def _launch_ahead(self, scheduled: ScheduledStep, launched: Launched) -> tuple[ScheduledStep, Launched] | None:
        """Launch the step after the launched decode step ``scheduled`` for the same sequences, fed its
        tokens on the device; None when that step cannot be known yet: a sequence reaches its
        max_tokens or max_model_len with this token, or the scheduler declines (see
        :meth:`Scheduler.schedule_ahead`)."""
        for seq in scheduled.seqs:
            if seq.num_output_tokens + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                return None
        ahead = self.scheduler.schedule_ahead(scheduled)
        if ahead is None or not self.graphs.fits(ahead.step):
            return None  # (a step wider than the graphs' block tables cannot come: max_model_len bounds it)
        self.steps_ahead += 1
        with self._stream:
            return ahead, self.graphs.launch(ahead.step, self._sampling(ahead, generated=1), feed=launched)

    def _collect(self, scheduled: ScheduledStep, tokens: np.ndarray, finished_only: bool) -> list[RequestOutput]:
        """Take a computed step's tokens: append, detokenize, check the stop conditions; the outputs."""
        outputs = []
        for seq in self.scheduler.update(scheduled, tokens):
            request = self._requests[seq.request_id]
            self._check_stop(request, seq.token_ids[-1])
            finished = request.finish_reason is not None
            if finished:
                self.scheduler.finish(seq)
                del self._requests[seq.request_id]
            if finished or not finished_only:
                outputs.append(request.output())
        return outputs

    def execute(self, step: StepInput, sampling: SamplingArrays | None = None) -> np.ndarray | None:
        """Forward the host ``step`` and sample each sequence with ``sampling`` (host tokens back).

        Under tensor parallelism every rank runs this for every step (follower ranks from
        :func:`~infinilm_nb.runtime.follower.follow`, without ``sampling``: they only take part in the
        forward's collectives, and get None, or the graph's unused tokens)."""
        with self._stream:
            if self.graphs is not None and self.graphs.fits(step):
                return self.graphs.decode(step, sampling)
            logits = self.model.forward(step.to(self.backend), self.cache)
            return None if sampling is None else self._sample(logits, sampling)

    def _sampling(self, scheduled: ScheduledStep, generated: int = 0) -> SamplingArrays:
        """The sampler's host parameters for each sequence of the step (``generated``: tokens each
        sequence samples before this step that are not appended yet, for a step launched ahead)."""
        seqs = scheduled.seqs
        n = len(seqs)
        params = [seq.params for seq in seqs]
        requests = self._requests
        seeds = step_seeds(
            np.fromiter((requests[seq.request_id].seed for seq in seqs), dtype=np.uint64, count=n),
            np.fromiter((seq.num_output_tokens + generated for seq in seqs), dtype=np.uint64, count=n),
        )
        return SamplingArrays(
            np.fromiter((p.temperature for p in params), dtype=np.float32, count=n),
            np.fromiter((p.top_k for p in params), dtype=np.int32, count=n),
            np.fromiter((p.top_p for p in params), dtype=np.float32, count=n),
            seeds,
        )

    def _sample(self, logits: Any, sampling: SamplingArrays) -> np.ndarray:
        """One token per row of ``logits`` through the backend's sampler, back on the host."""
        backend = self.backend
        out = backend.xp.empty(logits.shape[0], dtype=np.int32)
        backend.ops.sample(logits, *sampling.to(backend), out)
        return backend.to_host(out)

    def _check_stop(self, request: _Request, token: int) -> None:
        """Detokenize the new token and apply the stop conditions, in vLLM's order."""
        seq, params = request.seq, request.seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            request.finish_reason, request.stop_reason = "stop", None
        elif token in params.stop_token_ids:
            request.finish_reason, request.stop_reason = "stop", token
        else:
            before = len(request.text)
            request.text += request.detokenizer.add(token)
            if params.stop_strings and self._cut_at_stop_string(request, before):
                return
        if request.finish_reason is None and (
            seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            request.finish_reason = "length"
        if request.finish_reason is not None:
            request.text += request.detokenizer.flush()

    @staticmethod
    def _cut_at_stop_string(request: _Request, before: int) -> bool:
        """End the request at the earliest stop string in its new text; the text stops before it."""
        found: tuple[int, str] | None = None
        for stop in request.seq.params.stop_strings:
            index = request.text.find(stop, max(before - len(stop) + 1, 0))
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is None:
            return False
        request.text = request.text[: found[0]]
        request.finish_reason, request.stop_reason = "stop", found[1]
        return True
