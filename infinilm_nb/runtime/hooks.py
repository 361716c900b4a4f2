"""HookRegistry: named callbacks that receive the model's intermediate tensors during ``forward``.

Names the Llama model captures (``T`` tokens of the step, ``B`` sequences, ``H`` hidden size):

==============================  ==============  ===================================================
name                            shape           tensor
==============================  ==============  ===================================================
``embed.out``                   ``[T, H]``      the token embeddings (the residual stream's start)
``layers.{i}.input_norm.out``   ``[T, H]``      input RMSNorm of layer i
``layers.{i}.attn.qkv``         ``[T, Q+2K]``   fused q | k | v projection, after RoPE
``layers.{i}.attn.context``     ``[T, Hq, D]``  attention output, before o_proj
``layers.{i}.attn.out``         ``[T, H]``      residual stream after the attention block
``layers.{i}.mlp.out``          ``[T, H]``      residual stream after layer i (HF's ``hidden_states[i + 1]``)
``norm.out``                    ``[B, H]``      final RMSNorm of each sequence's last token
``logits``                      ``[B, V]``      float32 logits of each sequence's last token
==============================  ==============  ===================================================

A callback is called as ``callback(name, tensor)`` with the live backend array, which later kernels
overwrite: copy it (``backend.to_host``) to keep it. A registered name may be an ``fnmatch`` pattern
(``layers.*.mlp.out``). The model skips all of this (no name lookup, no copy) while nothing is registered.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, Callable

Callback = Callable[[str, Any], None]


def hook_names(num_layers: int) -> list[str]:
    """Every name the model captures, in the order it captures them."""
    per_layer = ("input_norm.out", "attn.qkv", "attn.context", "attn.out", "mlp.out")
    return ["embed.out"] + [f"layers.{i}.{n}" for i in range(num_layers) for n in per_layer] + ["norm.out", "logits"]


class HookHandle:
    """What :meth:`HookRegistry.register` returns; ``remove()`` unregisters the callback."""

    def __init__(self, registry: "HookRegistry", pattern: str, callback: Callback) -> None:
        self.registry = registry
        self.pattern = pattern
        self.callback = callback

    def remove(self) -> None:
        self.registry.unregister(self)


class HookRegistry:
    """Callbacks by tensor name (or ``fnmatch`` pattern); falsy while none is registered."""

    def __init__(self) -> None:
        self._handles: list[HookHandle] = []
        self._resolved: dict[str, list[Callback]] = {}

    def register(self, name: str, callback: Callback) -> HookHandle:
        """Call ``callback(name, tensor)`` whenever the model captures a tensor matching ``name``."""
        if not callable(callback):
            raise TypeError(f"hook callback for {name!r} must be callable, got {type(callback).__name__}")
        handle = HookHandle(self, name, callback)
        self._handles.append(handle)
        self._resolved.clear()
        return handle

    def unregister(self, handle: HookHandle) -> None:
        """Remove a callback registered earlier (a no-op if it is already gone)."""
        if handle in self._handles:
            self._handles.remove(handle)
            self._resolved.clear()

    def clear(self) -> None:
        """Remove every callback."""
        self._handles.clear()
        self._resolved.clear()

    def __bool__(self) -> bool:
        return bool(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    def wants(self, name: str) -> bool:
        """Whether any callback listens to ``name``."""
        return bool(self._callbacks(name))

    def capture(self, name: str, tensor: Any) -> None:
        """Hand ``tensor`` to every callback registered for ``name``."""
        for callback in self._callbacks(name):
            callback(name, tensor)

    def _callbacks(self, name: str) -> list[Callback]:
        callbacks = self._resolved.get(name)
        if callbacks is None:
            callbacks = [h.callback for h in self._handles if fnmatchcase(name, h.pattern)]
            self._resolved[name] = callbacks
        return callbacks
