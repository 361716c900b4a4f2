"""The Llama runtime: config, weights, layers, model, KV caches, scheduler and engine."""
