"""LLM: the user API in vLLM's shape — generate, chat and stream over an :class:`LLMEngine`."""

from __future__ import annotations

import atexit
import itertools
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence as Seq

from ..backend import get_backend
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .block_manager import BlockManager
from .cache import PagedKVCache, StaticKVCache, block_bytes, num_blocks_for_memory
from .config import ModelConfig, ParallelConfig, resolve_dtype
from .distributed import CommunicationGroup, RankInfo, bind_device, install_abort_on_error
from .engine import LLMEngine
from .follower import fatal_on_any_rank, follow, stop_followers
from .graphs import DecodeGraphs
from .llama import load_model
from .scheduler import Scheduler
from .tokenizer import Message, Tokenizer

Prompt = str | dict[str, Any]

MAX_MODEL_LEN_CAP = 8192  # the default max_model_len: the model's context, at most this
HOST_KV_BYTES = 1 << 30  # off the GPU, the default paged cache holds at most this much K/V
CACHES = ("paged", "static")
_tensor_parallel_llm_made = False  # under mpirun a process holds one LLM: the followers serve the first


class LLM:
    """An offline engine over one HF model directory (llama, mistral, qwen2).

    ``backend``: auto / cuda / cpu / sim. ``dtype``: float16 / float32 / bfloat16 (default: float16 on
    cuda, else float32). ``cache``: "paged" (blocks of ``block_size`` tokens, ``num_blocks`` of them or as many as
    ``gpu_memory_utilization`` of the GPU's memory allows) or "static" (one slot of ``max_model_len``
    tokens per running sequence, ``max_num_seqs`` slots or as many as fit; block_size and num_blocks
    are for the paged cache). ``max_model_len``: the longest prompt plus generation (default the
    model's context, at most 8192). Each step runs at most ``max_num_seqs`` sequences and
    ``max_num_batched_tokens`` tokens; longer prompts are prefilled in chunks. ``seed`` seeds the
    sampling of requests that give none. Decode steps of up to ``max_num_seqs`` sequences run on
    persistent buffers, replaying one CUDA graph per batch bucket on cuda (captured at start-up:
    :class:`~infinilm_nb.runtime.graphs.DecodeGraphs`); ``enforce_eager`` (vLLM's switch) runs every
    step eagerly instead. ``async_scheduling`` (on by default; one rank, with graphs) launches each
    decode step whose sequences go on before the previous step's tokens reach the host, so the GPU
    does not wait for the host's bookkeeping; the outputs are the same as step by step (False).

    ``model``: an HF directory, a ``.gguf`` file (converted once into the cache) or None for the
    embedded SmolLM2-135M-Instruct (fetched once; see :mod:`infinilm_nb.models`).

    Under ``mpirun -n N`` the model runs with tensor parallelism N, one rank per GPU. Rank 0's
    ``LLM(...)`` returns and does everything (tokenize, schedule, sample); on ranks > 0 the constructor
    never returns: it runs rank 0's forward steps (:mod:`infinilm_nb.runtime.follower`) until rank 0
    calls :meth:`close` (or its interpreter exits), then ends the process with status 0. So a script
    runs unchanged under mpirun, its code after ``LLM(...)`` on rank 0 alone; one LLM per process.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        backend: str = "auto",
        dtype: Any = None,
        cache: str = "paged",
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        num_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        enforce_eager: bool = False,
        async_scheduling: bool = True,
    ) -> None:
        if cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {cache!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        from ..models import resolve_model

        model_dir = resolve_model(model)
        self.rank = RankInfo.detect()
        self.backend = get_backend(backend)
        config = ModelConfig.from_pretrained(model_dir)
        self.parallel = ParallelConfig(self.rank.world_size, self.rank.rank)
        self.parallel.check(config, f"{model_dir / 'config.json'} with {self.rank.world_size} MPI ranks")
        self.group = self._start_group()
        self.max_model_len = _max_model_len(config, max_model_len)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.dtype = resolve_dtype(dtype, self.backend)
        with fatal_on_any_rank(self.group):
            self.model = load_model(
                model_dir, self.backend, dtype=self.dtype, max_model_len=self.max_model_len,
                progress=self.rank.is_driver, group=self.group,
            )
        self.enforce_eager = enforce_eager
        # activations first, so that the KV cache is sized with their memory already taken
        reach = self.max_model_len if cache == "static" else -(-self.max_model_len // block_size) * block_size
        self.model.reserve_buffers(max(max_num_batched_tokens, max_num_seqs), max_num_seqs, reach)
        if cache == "paged":
            blocks = num_blocks or self._agree(
                lambda: self._default_num_blocks(config, block_size, max_num_seqs, gpu_memory_utilization)
            )
            _check_capacity("num_blocks", blocks, block_size, self.max_model_len)
            self.cache = PagedKVCache(self.backend, config, blocks, block_size, self.dtype, self.parallel)
        else:
            slots = min(max_num_seqs, self._agree(
                lambda: self._default_num_blocks(config, self.max_model_len, max_num_seqs, gpu_memory_utilization)
            ))
            self.cache = StaticKVCache(self.backend, config, slots, self.max_model_len, self.dtype, self.parallel)
            max_num_seqs = min(max_num_seqs, slots)
        allocator = self.cache.allocator if cache == "paged" else self.cache  # a static cache hands out its slots
        manager = BlockManager(allocator, self.cache.block_size)
        self.scheduler = Scheduler(manager, max_num_seqs, max_num_batched_tokens)
        self.engine = LLMEngine(
            self.model,
            self.cache,
            self.tokenizer,
            self.backend,
            self.scheduler,
            self.max_model_len,
            _eos_token_ids(model_dir, config, self.tokenizer),
            seed=seed,
            graphs=None if enforce_eager else DecodeGraphs(self.model, self.cache, max_num_seqs, self.max_model_len),
            group=self.group,
            async_scheduling=async_scheduling,
        )
        self._ids = itertools.count()
        self._closed = False
        if self.group is not None:
            if not self.rank.is_driver:
                follow(self.group, self.engine)
                self._leave_group()  # where rank 0's close() does
                raise SystemExit(0)
            atexit.register(self.close)

    def _start_group(self) -> CommunicationGroup | None:
        """Under mpirun: this rank's GPU, the abort-on-error hook and the communication group."""
        global _tensor_parallel_llm_made
        if self.rank.world_size == 1:
            return None
        if _tensor_parallel_llm_made:
            raise RuntimeError("under mpirun a process holds one LLM (the other ranks serve the first one)")
        _tensor_parallel_llm_made = True
        install_abort_on_error(self.rank)
        if self.backend.on_gpu:
            bind_device(self.rank)
        return CommunicationGroup(self.rank, self.backend)

    def _agree(self, count: Callable[[], int]) -> int:
        """The smallest of every rank's ``count()`` (cache blocks: GPUs may have different free memory)."""
        with fatal_on_any_rank(self.group):
            mine = count()
        return mine if self.group is None else min(self.group.all_gather_object(mine))

    def close(self) -> None:
        """Under mpirun, let the follower ranks exit (also done at interpreter exit). The LLM cannot
        generate afterwards."""
        if self._closed:
            return
        self._closed = True
        if self.group is not None:
            stop_followers(self.group)
            self._leave_group()

    def _leave_group(self) -> None:
        """Free the NCCL communicator, at the same point on every rank (NCCL frees it jointly), after
        the decode graphs that hold its collectives."""
        if self.engine.graphs is not None:
            self.engine.graphs.release()
        self.group.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM is closed")

    def _default_num_blocks(self, config: ModelConfig, block_size: int, max_num_seqs: int, utilization: float) -> int:
        """Blocks of ``block_size`` tokens: on a GPU what ``utilization`` of its memory holds; elsewhere
        enough for ``max_num_seqs`` full-length sequences, within :data:`HOST_KV_BYTES` (but one at least)."""
        if self.backend.on_gpu:
            return num_blocks_for_memory(config, block_size, self.dtype, utilization, self.parallel)
        per_seq = -(-self.max_model_len // block_size)
        budget = HOST_KV_BYTES // block_bytes(config, block_size, self.dtype, self.parallel)
        return max(per_seq, min(per_seq * max_num_seqs, budget))

    def generate(
        self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Complete each prompt (a string or ``{"prompt_token_ids": [...]}``, or a list of them).

        ``sampling_params``: one for all, or one per prompt. Every prompt is checked before any work
        (an empty one is a ``ValueError``); a prompt longer than max_model_len finishes alone with
        finish_reason "error". Returns one final :class:`RequestOutput` per prompt, in order.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self._run([self.engine.tokenize_prompt(p) for p in prompts], sampling_params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) or a list of them, through the
        model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        return self._run([self._chat_prompt(c, add_generation_prompt) for c in conversations], sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, chat: bool = False) -> "TextStream":
        """Iterate over the text of one completion as its tokens arrive (``chat``: ``prompt`` is a
        conversation). The pieces join to the final text; ``.output`` holds the latest RequestOutput."""
        self._check_open()
        text, ids = self._chat_prompt(prompt, True) if chat else self.engine.tokenize_prompt(prompt)
        return TextStream(self.engine, str(next(self._ids)), text, ids, sampling_params or SamplingParams())

    def _chat_prompt(self, conversation: list[Message], add_generation_prompt: bool) -> tuple[str, list[int]]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        _, ids = self.engine.tokenize_prompt({"prompt_token_ids": ids})  # the same checks as any prompt
        return text, ids

    def _run(
        self, prompts: list[tuple[str | None, list[int]]], sampling_params: SamplingParams | Seq[SamplingParams] | None
    ) -> list[RequestOutput]:
        """Run tokenized prompts to completion; outputs in prompt order."""
        self._check_open()
        params = _per_prompt(sampling_params, len(prompts))
        ids = [str(next(self._ids)) for _ in prompts]
        final: dict[str, RequestOutput] = {}
        try:
            for request_id, (text, token_ids), p in zip(ids, prompts, params):
                self.engine.add_request(request_id, text, token_ids, p)
            while len(final) < len(ids):
                for output in self.engine.step(finished_only=True):
                    final[output.request_id] = output
        finally:
            for request_id in ids:
                if request_id not in final:
                    self.engine.abort(request_id)
        return [final[request_id] for request_id in ids]


class TextStream:
    """The text pieces of one request as its tokens arrive; closing it early aborts the request.

    After iteration: ``output`` (the final RequestOutput), ``time_to_first_token`` and ``elapsed``
    (seconds from the first ``next``).
    """

    def __init__(self, engine: LLMEngine, request_id: str, text: str | None, ids: list[int], params: SamplingParams):
        self.output: RequestOutput | None = None
        self.time_to_first_token: float | None = None
        self.elapsed: float | None = None
        self._pieces = self._run(engine, request_id, text, ids, params)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    def _run(
        self, engine: LLMEngine, request_id: str, text: str | None, ids: list[int], params: SamplingParams
    ) -> Iterator[str]:
        start = time.perf_counter()
        engine.add_request(request_id, text, ids, params)
        emitted = 0
        try:
            while self.output is None or not self.output.finished:
                for output in engine.step():
                    if output.request_id != request_id:
                        continue
                    self.output = output
                    if self.time_to_first_token is None:
                        self.time_to_first_token = time.perf_counter() - start
                    piece = output.outputs[0].text[emitted:]
                    emitted += len(piece)
                    if piece:
                        yield piece
        finally:
            self.elapsed = time.perf_counter() - start
            if self.output is None or not self.output.finished:
                engine.abort(request_id)


def _per_prompt(sampling_params: SamplingParams | Seq[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(
            f"sampling_params must be one SamplingParams or a list of one per prompt ({count}), got {len(params)} items"
        )
    return params


def _max_model_len(config: ModelConfig, requested: int | None) -> int:
    if requested is None:
        return min(config.max_position_embeddings, MAX_MODEL_LEN_CAP)
    if not 0 < requested <= config.max_position_embeddings:
        raise ValueError(
            f"max_model_len must be in [1, {config.max_position_embeddings}] (the model's "
            f"max_position_embeddings), got {requested}"
        )
    return requested


def _check_capacity(what: str, count: int, block_size: int, max_model_len: int) -> None:
    if count * block_size < max_model_len:
        raise ValueError(
            f"{what}={count} of {block_size} tokens hold {count * block_size} tokens, fewer than one sequence of "
            f"max_model_len={max_model_len}; give more blocks or memory, or a smaller max_model_len"
        )


def _eos_token_ids(model_dir: Path, config: ModelConfig, tokenizer: Tokenizer) -> set[int]:
    """End-of-sequence ids: config.json's, generation_config.json's and the tokenizer's eos token."""
    ids = set(config.eos_token_ids)
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
