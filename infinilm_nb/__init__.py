"""infinilm-nb: an LLM inference engine whose hot kernels are hand-written in Numba CUDA."""

from typing import Any

from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str) -> Any:
    # LLM pulls in the runtime (and, through it, numba on some backends): import it on first use,
    # so that `import infinilm_nb` stays light and the simulator can still be switched on first
    if name == "LLM":
        from .runtime.llm import LLM

        return LLM
    raise AttributeError(f"module 'infinilm_nb' has no attribute {name!r}")
