"""The Llama decoder (llama, mistral, qwen2) on the backend's ops, and a registry by model_type.

One step (see ../shared/DESIGN.md, "One step, as data"): the residual stream lives in one ``[T, H]``
buffer. The embedding writes it; QKV and gate-up read it RMS-normalised (``linear(r, ...,
norm_eps=eps)``: the decode GEMMs normalise their input in their own loop, every other path through
the scratch ``hidden``), and o_proj and down_proj add their products back into it in their epilogue
(``linear(..., residual=r, out=r)``), so neither a separate RMSNorm nor a residual add runs in a
decode step. For that the two norms' weights are folded into the columns of the QKV and gate-up
weights at load (:func:`fold_norm_weights`). QKV also applies RoPE to q and k and stores k and v in
the paged cache (``linear_rope_store_kv``: in the decode GEMM's epilogue, else by the rope_store_kv
kernel after it). Under tensor parallelism the residual buffer is what gets all-reduced. Only each
sequence's last token goes through the final norm and the lm_head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..kernels import reference
from .batch import StepInput
from .config import ModelConfig, ParallelConfig, resolve_dtype
from .hooks import HookRegistry
from .layers import (
    GateUpParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding,
)
from .weights import ModelWeights, expected_shapes

# Steps of at most this many tokens split each token's context over several attention blocks (on the
# kernel backends): a decode batch has too few (token, KV head) pairs to fill a GPU otherwise.
SPLIT_ATTENTION_TOKENS = 256


@dataclass
class StepBuffers:
    """The activations of one step of ``T`` tokens and ``B`` sequences.

    A step's buffers are leading slices (views) of the model's :class:`ActivationBuffers`, which is
    why every op writes into these instead of allocating.
    """

    residual: Any  # [T, H] the residual stream
    hidden: Any  # [T, H] scratch: the residual normalised where a GEMM does not do it itself
    qkv: Any  # [T, (Hq + 2 Hk) D]
    context: Any  # [T, Hq, D] attention output
    gate_up: Any  # [T, 2 I]
    act: Any  # [T, I]
    last: Any  # [B, H] the residual of each sequence's last token
    last_norm: Any  # [B, H]
    logits: Any  # [B, V] in the activation dtype
    workspace: Any = None  # kernels.attention.AttentionWorkspace: split-context attention for few tokens

    @classmethod
    def allocate(
        cls, backend: Any, config: ModelConfig, dtype: np.dtype, num_tokens: int, num_seqs: int
    ) -> "StepBuffers":
        """Fresh buffers for steps of up to ``num_tokens`` tokens and ``num_seqs`` sequences (no workspace)."""
        empty = backend.xp.empty
        t, b, h = num_tokens, num_seqs, config.hidden_size
        return cls(
            residual=empty((t, h), dtype),
            hidden=empty((t, h), dtype),
            qkv=empty((t, config.q_size + 2 * config.kv_size), dtype),
            context=empty((t, config.num_attention_heads, config.head_dim), dtype),
            gate_up=empty((t, 2 * config.intermediate_size), dtype),
            act=empty((t, config.intermediate_size), dtype),
            last=empty((b, h), dtype),
            last_norm=empty((b, h), dtype),
            logits=empty((b, config.vocab_size), dtype),
        )

    def view(self, num_tokens: int, num_seqs: int, workspace: Any = None) -> "StepBuffers":
        """The leading ``num_tokens`` / ``num_seqs`` rows of every buffer (C-contiguous views)."""
        t, b = num_tokens, num_seqs
        return StepBuffers(
            residual=self.residual[:t],
            hidden=self.hidden[:t],
            qkv=self.qkv[:t],
            context=self.context[:t],
            gate_up=self.gate_up[:t],
            act=self.act[:t],
            last=self.last[:b],
            last_norm=self.last_norm[:b],
            logits=self.logits[:b],
            workspace=workspace,
        )


class ActivationBuffers:
    """The model's persistent activation buffers: one :class:`StepBuffers` for the largest step,
    of which each step takes leading slices, and the split-attention workspace.

    :meth:`reserve` sizes them once (the LLM does so before sizing the KV cache, so that their memory
    counts); a step that outgrows them replaces them with larger ones. Steady-state steps allocate
    nothing, and a CUDA graph captured on a slice stays valid: it holds the arrays it was captured on.
    """

    def __init__(self, backend: Any, config: ModelConfig, dtype: np.dtype) -> None:
        self.backend = backend
        self.config = config
        self.dtype = dtype
        self.max_tokens = 0
        self.max_seqs = 0
        self.max_context = 0  # the workspace's reach in keys
        self.workspace_tokens = 0
        self._full: StepBuffers | None = None
        self._workspace: Any = None

    def reserve(self, num_tokens: int, num_seqs: int, max_context: int = 0) -> None:
        """Make room for steps of ``num_tokens`` tokens and ``num_seqs`` sequences whose block tables
        reach ``max_context`` keys (the block-table width times the block size)."""
        if num_tokens > self.max_tokens or num_seqs > self.max_seqs:
            self.max_tokens = max(num_tokens, self.max_tokens)
            self.max_seqs = max(num_seqs, self.max_seqs)
            self._full = None  # let the old buffers go before the new ones are allocated
            self._full = StepBuffers.allocate(self.backend, self.config, self.dtype, self.max_tokens, self.max_seqs)
        split_tokens = min(num_tokens, SPLIT_ATTENTION_TOKENS)
        if self.backend.name == "cpu" or max_context <= 0:
            return
        if max_context > self.max_context or split_tokens > self.workspace_tokens:
            from ..kernels.attention import AttentionWorkspace  # imported only on a kernel backend

            # grown contexts double, so that a sequence growing block by block reallocates rarely
            if max_context > self.max_context:
                self.max_context = max(max_context, 2 * self.max_context)
            self.workspace_tokens = max(split_tokens, self.workspace_tokens)
            self._workspace = None
            self._workspace = AttentionWorkspace.allocate(
                self.backend.xp, self.workspace_tokens, self.config.num_attention_heads, self.config.head_dim,
                self.max_context,
            )

    def view(self, num_tokens: int, num_seqs: int, max_context: int = 0) -> StepBuffers:
        """Buffers for one step (views; grown first if the step outgrows them). Steps of at most
        :data:`SPLIT_ATTENTION_TOKENS` tokens get the workspace on a kernel backend."""
        self.reserve(num_tokens, num_seqs, max_context)
        workspace = self._workspace if num_tokens <= SPLIT_ATTENTION_TOKENS else None
        return self._full.view(num_tokens, num_seqs, workspace)


class LlamaAttention:
    """QKV projection with RoPE and the K/V store, paged attention, o_proj adding into the residual."""

    def __init__(
        self, backend: Any, config: ModelConfig, weights: dict[str, Any], prefix: str, cos_sin: Any, group: Any = None
    ) -> None:
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(
            backend, weights[prefix + "qkv_proj.weight"], weights.get(prefix + "qkv_proj.bias"),
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.o_proj = RowParallelLinear(
            backend, weights[prefix + "o_proj.weight"], weights.get(prefix + "o_proj.bias"), group
        )
        self.cos_sin = cos_sin
        self.scale = config.head_dim ** -0.5
        self.norm_eps = config.rms_norm_eps  # of the input norm, folded into qkv_proj

    def __call__(self, step: StepInput, k_cache: Any, v_cache: Any, buf: StepBuffers) -> None:
        ops = self.backend.ops
        qkv = self.qkv_proj
        ops.linear_rope_store_kv(
            buf.residual, qkv.weight, buf.qkv, step.positions, self.cos_sin, k_cache, v_cache, step.slot_mapping,
            qkv.num_heads, qkv.num_kv_heads, bias=qkv.bias, norm_eps=self.norm_eps, normed=buf.hidden,
        )
        q = qkv.split(buf.qkv)[0]
        extra = {} if buf.workspace is None else {"workspace": buf.workspace}
        ops.paged_attention(
            q, k_cache, v_cache, step.block_tables, step.context_lens, step.query_start_loc, self.scale, buf.context,
            max_query_len=step.max_query_len, **extra,
        )
        context = buf.context.reshape(buf.context.shape[0], -1)
        self.o_proj(context, buf.residual, residual=buf.residual)


class LlamaMLP:
    """Fused gate-up projection, SiLU-mul and down_proj (adding into the residual)."""

    def __init__(self, backend: Any, weights: dict[str, Any], prefix: str, norm_eps: float, group: Any = None) -> None:
        self.backend = backend
        self.norm_eps = norm_eps  # of the post-attention norm, folded into gate_up_proj
        self.gate_up_proj = GateUpParallelLinear(
            backend, weights[prefix + "gate_up_proj.weight"], weights.get(prefix + "gate_up_proj.bias")
        )
        self.down_proj = RowParallelLinear(
            backend, weights[prefix + "down_proj.weight"], weights.get(prefix + "down_proj.bias"), group
        )

    def __call__(self, buf: StepBuffers) -> None:
        if self.gate_up_proj.bias is None:  # SiLU-mul in the GEMM's epilogue: gate_up never hits memory
            self.backend.ops.linear_silu_mul(
                buf.residual, self.gate_up_proj.weight, buf.act, norm_eps=self.norm_eps, normed=buf.hidden
            )
        else:
            self.gate_up_proj(buf.residual, buf.gate_up, norm_eps=self.norm_eps, normed=buf.hidden)
            self.backend.ops.silu_mul(buf.gate_up, buf.act)
        self.down_proj(buf.act, buf.residual, residual=buf.residual)


class LlamaDecoderLayer:
    """RMSNorm -> attention -> RMSNorm -> MLP, both blocks adding into the residual stream (the norms
    inside QKV and gate-up; the input norm runs on its own only for the ``input_norm.out`` hook)."""

    def __init__(
        self, backend: Any, config: ModelConfig, weights: dict[str, Any], index: int, cos_sin: Any, group: Any = None
    ) -> None:
        prefix = f"layers.{index}."
        self.input_layernorm = RMSNorm(backend, weights[prefix + "input_layernorm"], config.rms_norm_eps)
        self.self_attn = LlamaAttention(backend, config, weights, prefix, cos_sin, group)
        self.mlp = LlamaMLP(backend, weights, prefix, config.rms_norm_eps, group)
        self.hook_names = {n: prefix + n for n in ("input_norm.out", "attn.qkv", "attn.context", "attn.out", "mlp.out")}

    def __call__(self, step: StepInput, k_cache: Any, v_cache: Any, buf: StepBuffers, hooks: HookRegistry | None) -> None:
        if hooks:
            hooks.capture(self.hook_names["input_norm.out"], self.input_layernorm(buf.residual, buf.hidden))
        self.self_attn(step, k_cache, v_cache, buf)
        if hooks:
            hooks.capture(self.hook_names["attn.qkv"], buf.qkv)
            hooks.capture(self.hook_names["attn.context"], buf.context)
            hooks.capture(self.hook_names["attn.out"], buf.residual)
        self.mlp(buf)
        if hooks:
            hooks.capture(self.hook_names["mlp.out"], buf.residual)


class LlamaForCausalLM:
    """A Llama-family causal LM: ``forward(step, cache)`` gives each sequence's next-token logits.

    ``weights`` maps runtime names (:func:`~infinilm_nb.runtime.weights.expected_shapes`) to arrays,
    host or backend: a :class:`~infinilm_nb.runtime.weights.ModelWeights` reading a checkpoint, or a
    plain dict. Without ``lm_head`` the embedding is tied. ``dtype`` defaults to float16 on cuda and
    float32 elsewhere; ``max_model_len`` bounds the RoPE table (default: max_position_embeddings).

    Tensor parallelism: ``group`` (a :class:`~infinilm_nb.runtime.distributed.CommunicationGroup` of
    ``parallel.tp_size`` ranks) and ``weights`` holding this rank's slices (``ModelWeights(...,
    parallel=parallel)``); every rank runs ``forward`` on the same steps, and each gets the full logits.
    ``shard_config`` holds the sizes this rank computes with (``config`` at tp = 1).
    """

    def __init__(
        self,
        config: ModelConfig,
        backend: Any,
        weights: Mapping[str, Any],
        hooks: HookRegistry | None = None,
        dtype: Any = None,
        max_model_len: int | None = None,
        parallel: ParallelConfig | None = None,
        group: Any = None,
    ) -> None:
        parallel = parallel or ParallelConfig()
        if parallel.tp_size > 1 and (group is None or group.world_size != parallel.tp_size):
            raise ValueError(f"tp_size={parallel.tp_size} needs a CommunicationGroup of as many ranks")
        self.config = config
        self.parallel = parallel
        self.shard_config = parallel.shard(config)
        self.backend = backend
        self.dtype = resolve_dtype(dtype, backend)
        self.hooks = hooks if hooks is not None else HookRegistry()
        arrays = fold_norm_weights(self._upload(weights), config.num_hidden_layers)
        positions = max_model_len or config.max_position_embeddings
        cos_sin = backend.asarray(
            reference.rope_cache(config.head_dim, positions, config.rope_theta, config.rope_scaling)
        )
        local = self.shard_config
        vocab_start = parallel.rank * local.vocab_size
        self.embed_tokens = VocabParallelEmbedding(backend, arrays["embed_tokens"], vocab_start, group)
        self.layers = [
            LlamaDecoderLayer(backend, local, arrays, i, cos_sin, group) for i in range(config.num_hidden_layers)
        ]
        self.norm = RMSNorm(backend, arrays["norm"], config.rms_norm_eps)
        self.lm_head = ParallelLMHead(backend, arrays.get("lm_head", arrays["embed_tokens"]), group)
        self.activations = ActivationBuffers(backend, local, self.dtype)

    def _upload(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        """Check names and shapes and move each tensor to the backend in the runtime dtype."""
        shapes = expected_shapes(self.shard_config, tied="lm_head" not in weights)
        arrays: dict[str, Any] = {}
        for name in weights:
            if name not in shapes:
                raise ValueError(f"unexpected weight {name!r} for a {self.config.model_type} model with this config")
            array = weights[name]
            if tuple(array.shape) != shapes[name]:
                raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
            device = self.backend.asarray(array) if isinstance(array, np.ndarray) else array
            # reference.convert, not astype: bfloat16 (uint16 bits) must be widened or rounded
            arrays[name] = device if device.dtype == self.dtype else reference.convert(device, self.dtype)
        missing = [name for name in shapes if name not in arrays]
        if missing:
            raise ValueError(f"missing weight {missing[0]!r} (expected shape {shapes[missing[0]]})")
        return arrays

    def reserve_buffers(self, num_tokens: int, num_seqs: int, max_context: int) -> None:
        """Allocate the activation buffers for steps of up to ``num_tokens`` tokens and ``num_seqs``
        sequences over ``max_context`` keys, now rather than at the first step that needs them."""
        self.activations.reserve(num_tokens, num_seqs, max_context)
        self.lm_head.reserve(num_seqs, self.dtype)

    def buffers(self, step: StepInput, cache: Any) -> StepBuffers:
        """The activation buffers of a step: views of :attr:`activations`."""
        return self.activations.view(step.num_tokens, step.num_seqs, int(step.block_tables.shape[1]) * cache.block_size)

    def forward(self, step: StepInput, cache: Any) -> Any:
        """Run one step; ``step``'s arrays are on the backend. Returns float32 logits ``[B, vocab]``
        (a new array: the buffers they are computed in belong to the next step too).

        ``cache`` is a :class:`~infinilm_nb.runtime.cache.PagedKVCache` or a
        :class:`~infinilm_nb.runtime.cache.StaticKVCache`; this step's K and V are stored into it at
        ``step.slot_mapping`` before attention reads it through ``step.block_tables``.
        """
        logits = reference.convert(self.run(step, cache, self.buffers(step, cache)), np.float32)
        if self.hooks:
            self.hooks.capture("logits", logits)
        return logits

    def run(self, step: StepInput, cache: Any, buf: StepBuffers) -> Any:
        """The step into ``buf``; returns the logits (activation dtype, ``[B, vocab]``: ``buf.logits``, or
        under tensor parallelism the lm_head's buffer gathering every rank's ``buf.logits``).

        Every op writes into ``buf``: nothing is allocated and nothing waits for the device, so a
        CUDA graph can capture this (with no hooks registered) on persistent buffers. Every sequence
        of the step has at least one token.
        """
        ops = self.backend.ops
        hooks = self.hooks if self.hooks else None
        self.embed_tokens(step.token_ids, buf.residual)
        if hooks:
            hooks.capture("embed.out", buf.residual)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = cache.layer(i)
            layer(step, k_cache, v_cache, buf, hooks)
        last = buf.residual  # one token per sequence (a decode step): every row is a last token
        if step.num_tokens != step.num_seqs:
            ops.embedding(step.last_token_index, buf.residual, buf.last)  # the embedding kernel gathers rows
            last = buf.last
        self.norm(last, buf.last_norm)
        if hooks:
            hooks.capture("norm.out", buf.last_norm)
        return self.lm_head(buf.last_norm, buf.logits)

    __call__ = forward


def fold_norm_weights(arrays: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """``arrays`` with each layer's QKV and gate-up weights times the weight of the RMSNorm before
    them, column by column (new arrays, computed in float32): ``rms_norm(x, g) @ W.T`` is
    ``(x / rms(x)) @ (W diag(g)).T``, so the GEMMs can take the unnormalised residual and scale their
    products by ``1 / rms(x)`` (``linear(..., norm_eps=)``). The norm weights stay for the hooks."""
    folded = dict(arrays)
    for i in range(num_layers):
        for norm, weight in (("input_layernorm", "qkv_proj.weight"), ("post_attention_layernorm", "gate_up_proj.weight")):
            w, g = arrays[f"layers.{i}.{weight}"], arrays[f"layers.{i}.{norm}"]
            folded[f"layers.{i}.{weight}"] = reference.cast(reference.to_f32(w) * reference.to_f32(g), w.dtype)
    return folded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: a Llama (its sliding window is not applied; the full context is attended)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: a Llama with biases on q, k and v (``config.attention_bias``)."""


MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def load_model(
    model_dir: str | Path,
    backend: Any = None,
    dtype: Any = None,
    hooks: HookRegistry | None = None,
    max_model_len: int | None = None,
    progress: bool = True,
    group: Any = None,
) -> LlamaForCausalLM:
    """Read ``model_dir`` (config.json + safetensors) onto ``backend`` (a name, a Backend, or auto).

    With ``group`` (a CommunicationGroup of several ranks) this rank reads only its tensor-parallel
    slices; a rank count that does not split the model is a ``ValueError`` before any weight is read.
    """
    from ..backend import Backend, get_backend

    backend = backend if isinstance(backend, Backend) else get_backend(backend)
    config = ModelConfig.from_pretrained(model_dir)
    parallel = ParallelConfig() if group is None else ParallelConfig(group.world_size, group.info.rank)
    dtype = resolve_dtype(dtype, backend)
    weights = ModelWeights(model_dir, config, dtype, progress=progress, parallel=parallel)
    model_class = MODEL_REGISTRY[config.model_type]
    return model_class(
        config, backend, weights, hooks=hooks, dtype=dtype, max_model_len=max_model_len, parallel=parallel, group=group
    )
