"""The Llama decoder (llama, mistral, qwen2) on the backend's ops, and a registry by model_type.

One step (see ../shared/DESIGN.md, "One step, as data"): the residual stream lives in one ``[T, H]``
buffer. The embedding writes it; each layer normalises it into ``hidden``, and o_proj and down_proj
add their products back into it in their epilogue (``linear(..., residual=r, out=r)``), so no separate
residual add runs. Under tensor parallelism that buffer is what gets all-reduced. Only each
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
from .layers import GateUpParallelLinear, QKVParallelLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding
from .weights import ModelWeights, expected_shapes

# Steps of at most this many tokens split each token's context over several attention blocks (on the
# kernel backends): a decode batch has too few (token, KV head) pairs to fill a GPU otherwise.
SPLIT_ATTENTION_TOKENS = 256


@dataclass
class StepBuffers:
    """The activations of one step of ``T`` tokens and ``B`` sequences.

    Allocated per step today; CUDA graphs will keep one persistent set of the largest size and use
    leading slices of it, which is why every op writes into these instead of allocating.
    """

    residual: Any  # [T, H] the residual stream
    hidden: Any  # [T, H] normalised residual, the input of QKV and gate-up
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
        cls, backend: Any, config: ModelConfig, dtype: np.dtype, num_tokens: int, num_seqs: int,
        split_context: int | None = None,
    ) -> "StepBuffers":
        """Buffers for the step; with ``split_context`` (the block tables' reach in keys) an attention
        workspace too, so that a decode step's long contexts are spread over many GPU blocks."""
        empty = backend.xp.empty
        t, b, h = num_tokens, num_seqs, config.hidden_size
        workspace = None
        if split_context is not None:
            from ..kernels.attention import AttentionWorkspace  # imported only on a kernel backend

            workspace = AttentionWorkspace.allocate(backend.xp, t, config.num_attention_heads, config.head_dim, split_context)
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
            workspace=workspace,
        )


class LlamaAttention:
    """Fused QKV projection, RoPE, K/V store, paged attention and o_proj (adding into the residual)."""

    def __init__(self, backend: Any, config: ModelConfig, weights: dict[str, Any], prefix: str, cos_sin: Any) -> None:
        self.backend = backend
        self.qkv_proj = QKVParallelLinear(
            backend, weights[prefix + "qkv_proj.weight"], weights.get(prefix + "qkv_proj.bias"),
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.o_proj = RowParallelLinear(backend, weights[prefix + "o_proj.weight"], weights.get(prefix + "o_proj.bias"))
        self.cos_sin = cos_sin
        self.scale = config.head_dim ** -0.5

    def __call__(self, step: StepInput, k_cache: Any, v_cache: Any, buf: StepBuffers) -> None:
        ops = self.backend.ops
        self.qkv_proj(buf.hidden, buf.qkv)
        q, k, v = self.qkv_proj.split(buf.qkv)
        ops.rope(q, k, step.positions, self.cos_sin)
        ops.store_kv(k, v, k_cache, v_cache, step.slot_mapping)
        extra = {} if buf.workspace is None else {"workspace": buf.workspace}
        ops.paged_attention(
            q, k_cache, v_cache, step.block_tables, step.context_lens, step.query_start_loc, self.scale, buf.context,
            **extra,
        )
        context = buf.context.reshape(buf.context.shape[0], -1)
        self.o_proj(context, buf.residual, residual=buf.residual)


class LlamaMLP:
    """Fused gate-up projection, SiLU-mul and down_proj (adding into the residual)."""

    def __init__(self, backend: Any, weights: dict[str, Any], prefix: str) -> None:
        self.backend = backend
        self.gate_up_proj = GateUpParallelLinear(
            backend, weights[prefix + "gate_up_proj.weight"], weights.get(prefix + "gate_up_proj.bias")
        )
        self.down_proj = RowParallelLinear(backend, weights[prefix + "down_proj.weight"], weights.get(prefix + "down_proj.bias"))

    def __call__(self, buf: StepBuffers) -> None:
        self.gate_up_proj(buf.hidden, buf.gate_up)
        self.backend.ops.silu_mul(buf.gate_up, buf.act)
        self.down_proj(buf.act, buf.residual, residual=buf.residual)


class LlamaDecoderLayer:
    """RMSNorm -> attention -> RMSNorm -> MLP, both blocks adding into the residual stream."""

    def __init__(self, backend: Any, config: ModelConfig, weights: dict[str, Any], index: int, cos_sin: Any) -> None:
        prefix = f"layers.{index}."
        self.input_layernorm = RMSNorm(backend, weights[prefix + "input_layernorm"], config.rms_norm_eps)
        self.self_attn = LlamaAttention(backend, config, weights, prefix, cos_sin)
        self.post_attention_layernorm = RMSNorm(backend, weights[prefix + "post_attention_layernorm"], config.rms_norm_eps)
        self.mlp = LlamaMLP(backend, weights, prefix)
        self.hook_names = {n: prefix + n for n in ("input_norm.out", "attn.qkv", "attn.context", "attn.out", "mlp.out")}

    def __call__(self, step: StepInput, k_cache: Any, v_cache: Any, buf: StepBuffers, hooks: HookRegistry | None) -> None:
        self.input_layernorm(buf.residual, buf.hidden)
        if hooks:
            hooks.capture(self.hook_names["input_norm.out"], buf.hidden)
        self.self_attn(step, k_cache, v_cache, buf)
        if hooks:
            hooks.capture(self.hook_names["attn.qkv"], buf.qkv)
            hooks.capture(self.hook_names["attn.context"], buf.context)
            hooks.capture(self.hook_names["attn.out"], buf.residual)
        self.post_attention_layernorm(buf.residual, buf.hidden)
        self.mlp(buf)
        if hooks:
            hooks.capture(self.hook_names["mlp.out"], buf.residual)


class LlamaForCausalLM:
    """A Llama-family causal LM: ``forward(step, cache)`` gives each sequence's next-token logits.

    ``weights`` maps runtime names (:func:`~infinilm_nb.runtime.weights.expected_shapes`) to arrays,
    host or backend: a :class:`~infinilm_nb.runtime.weights.ModelWeights` reading a checkpoint, or a
    plain dict. Without ``lm_head`` the embedding is tied. ``dtype`` defaults to float16 on cuda and
    float32 elsewhere; ``max_model_len`` bounds the RoPE table (default: max_position_embeddings).
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
    ) -> None:
        parallel = parallel or ParallelConfig()
        if parallel.tp_size != 1:
            raise NotImplementedError(f"tensor parallelism is not implemented yet (tp_size={parallel.tp_size})")
        self.config = config
        self.backend = backend
        self.dtype = resolve_dtype(dtype, backend)
        self.hooks = hooks if hooks is not None else HookRegistry()
        arrays = self._upload(weights)
        positions = max_model_len or config.max_position_embeddings
        cos_sin = backend.asarray(
            reference.rope_cache(config.head_dim, positions, config.rope_theta, config.rope_scaling)
        )
        self.embed_tokens = VocabParallelEmbedding(backend, arrays["embed_tokens"])
        self.layers = [LlamaDecoderLayer(backend, config, arrays, i, cos_sin) for i in range(config.num_hidden_layers)]
        self.norm = RMSNorm(backend, arrays["norm"], config.rms_norm_eps)
        self.lm_head = arrays.get("lm_head", arrays["embed_tokens"])

    def _upload(self, weights: Mapping[str, Any]) -> dict[str, Any]:
        """Check names and shapes and move each tensor to the backend in the runtime dtype."""
        shapes = expected_shapes(self.config, tied="lm_head" not in weights)
        arrays: dict[str, Any] = {}
        for name in weights:
            if name not in shapes:
                raise ValueError(f"unexpected weight {name!r} for a {self.config.model_type} model with this config")
            array = weights[name]
            if tuple(array.shape) != shapes[name]:
                raise ValueError(f"weight {name!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
            if isinstance(array, np.ndarray):
                arrays[name] = self.backend.asarray(array, dtype=self.dtype)
            else:
                arrays[name] = array.astype(self.dtype, copy=False)
        missing = [name for name in shapes if name not in arrays]
        if missing:
            raise ValueError(f"missing weight {missing[0]!r} (expected shape {shapes[missing[0]]})")
        return arrays

    def buffers(self, step: StepInput, cache: Any) -> StepBuffers:
        """The activation buffers of a step (fresh ones today)."""
        split = None
        if self.backend.name != "cpu" and step.num_tokens <= SPLIT_ATTENTION_TOKENS:
            split = int(step.block_tables.shape[1]) * cache.block_size
        return StepBuffers.allocate(self.backend, self.config, self.dtype, step.num_tokens, step.num_seqs, split)

    def forward(self, step: StepInput, cache: Any) -> Any:
        """Run one step; ``step``'s arrays are on the backend. Returns float32 logits ``[B, vocab]``.

        ``cache`` is a :class:`~infinilm_nb.runtime.cache.PagedKVCache` or a
        :class:`~infinilm_nb.runtime.cache.StaticKVCache`; this step's K and V are stored into it at
        ``step.slot_mapping`` before attention reads it through ``step.block_tables``.
        """
        ops = self.backend.ops
        buf = self.buffers(step, cache)
        hooks = self.hooks if self.hooks else None
        self.embed_tokens(step.token_ids, buf.residual)
        if hooks:
            hooks.capture("embed.out", buf.residual)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = cache.layer(i)
            layer(step, k_cache, v_cache, buf, hooks)
        ops.embedding(step.last_token_index, buf.residual, buf.last)  # the embedding kernel gathers rows
        self.norm(buf.last, buf.last_norm)
        if hooks:
            hooks.capture("norm.out", buf.last_norm)
        ops.linear(buf.last_norm, self.lm_head, buf.logits)
        logits = buf.logits if buf.logits.dtype == np.float32 else buf.logits.astype(np.float32)
        if hooks:
            hooks.capture("logits", logits)
        return logits

    __call__ = forward


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
) -> LlamaForCausalLM:
    """Read ``model_dir`` (config.json + safetensors) onto ``backend`` (a name, a Backend, or auto)."""
    from ..backend import Backend, get_backend

    backend = backend if isinstance(backend, Backend) else get_backend(backend)
    config = ModelConfig.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype, backend)
    weights = ModelWeights(model_dir, config, dtype, progress=progress)
    model_class = MODEL_REGISTRY[config.model_type]
    return model_class(config, backend, weights, hooks=hooks, dtype=dtype, max_model_len=max_model_len)
