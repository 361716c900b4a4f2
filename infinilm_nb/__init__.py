"""infinilm-nb: an LLM inference engine whose hot kernels are hand-written in Numba CUDA."""

__version__ = "0.1.0"
