"""Model format conversion: GGUF files into the HF directories the runtime loads.

``convert_gguf`` is imported on first use, so that importing this package (e.g. for the CLI entry
points in :mod:`infinilm_nb.convert.commands`) does not need the optional ``gguf`` package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_gguf"]


def __getattr__(name: str) -> Any:
    if name == "convert_gguf":
        from infinilm_nb.convert.gguf import convert_gguf

        return convert_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
