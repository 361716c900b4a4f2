"""HookRegistry, and the tensors the model hands to it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.cache import PagedKVCache
from infinilm_nb.runtime.hooks import HookRegistry, hook_names
from infinilm_nb.runtime.llama import load_model
from tests.helpers import rel_err
from tests.runtime.steps import CachedSeq, run_step


def test_registry_register_capture_remove():
    hooks = HookRegistry()
    assert not hooks and len(hooks) == 0
    seen = []
    handle = hooks.register("layers.*.mlp.out", lambda name, t: seen.append((name, t)))
    exact = hooks.register("logits", lambda name, t: seen.append((name, -t)))
    assert hooks and len(hooks) == 2
    assert hooks.wants("layers.3.mlp.out") and not hooks.wants("layers.3.attn.out")
    hooks.capture("layers.3.mlp.out", 1)
    hooks.capture("layers.3.attn.out", 2)
    hooks.capture("logits", 3)
    assert seen == [("layers.3.mlp.out", 1), ("logits", -3)]
    handle.remove()
    hooks.capture("layers.3.mlp.out", 4)
    assert len(seen) == 2
    hooks.unregister(handle)  # already gone: a no-op
    hooks.unregister(exact)
    assert not hooks
    with pytest.raises(TypeError, match="hook callback for 'logits' must be callable"):
        hooks.register("logits", 5)


def test_hook_names():
    names = hook_names(2)
    assert names[0] == "embed.out" and names[-2:] == ["norm.out", "logits"]
    assert "layers.1.attn.context" in names and len(names) == 2 + 2 * 5 + 1


def test_model_hands_every_name_and_matches_transformers(tiny_model_dir, tiny_hf_model):
    """mlp.out of layer i is transformers' hidden_states[i + 1]; every documented name is captured."""
    hooks = HookRegistry()
    captured = {}
    hooks.register("*", lambda name, t: captured.setdefault(name, np.array(t)))
    model = load_model(tiny_model_dir, get_backend("cpu"), hooks=hooks, progress=False)
    prompt = [5, 17, 99, 42, 7, 250]
    logits = run_step(model, [(CachedSeq(PagedKVCache(model.backend, model.config, 4, 4, model.dtype)), prompt)])
    assert list(captured) == hook_names(model.config.num_hidden_layers)
    with torch.no_grad():
        hf = tiny_hf_model(torch.tensor([prompt]), output_hidden_states=True)
    states = [h[0].numpy() for h in hf.hidden_states]
    assert rel_err(captured["embed.out"], states[0]) < 1e-6
    assert rel_err(captured["layers.0.mlp.out"], states[1]) < 1e-5
    assert rel_err(captured["norm.out"][0], states[-1][-1]) < 1e-5  # HF's last state is normalised
    assert captured["layers.1.attn.context"].shape == (len(prompt), 4, 16)
    np.testing.assert_array_equal(captured["logits"], logits)
