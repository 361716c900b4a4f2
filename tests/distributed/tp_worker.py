"""Under mpiexec: tensor-parallel forwards and generation on tiny models, saved by rank 0 for test_tp.py.

``python -m tests.distributed.tp_worker OUT.npz --models DIR... [--llm DIR]``: every rank loads each
model's slices and runs :func:`script` with a paged and a static cache (the same steps on every rank);
then, with ``--llm``, rank 0 generates through ``LLM`` while the other ranks follow inside ``LLM(...)``.
Rank 0 saves ``<model index>/<cache>`` logits and ``llm`` tokens. The same :func:`script` and
:func:`generate` give the tp = 1 reference in the test process.
"""

from __future__ import annotations

import argparse

import numpy as np

from infinilm_nb import LLM, SamplingParams
from infinilm_nb.runtime.cache import PagedKVCache, StaticKVCache
from tests.runtime.steps import CachedSeq, run_step

PROMPT_A = [5, 17, 99, 42, 7, 250, 3, 64, 128]
PROMPT_B = [9, 8, 7, 6, 5]
DECODES = 5
LLM_PROMPTS = [[3, 14, 15, 92, 65], [27, 18, 28], [100, 200, 250, 3, 7, 9, 11]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def script(model, cache_kind: str) -> np.ndarray:
    """Logits rows ``[R, vocab]`` of: a prefill, a prefill mixed with a decode, then greedy decodes of both."""
    if cache_kind == "paged":
        cache = PagedKVCache(model.backend, model.config, 24, 4, model.dtype, model.parallel)
    else:
        cache = StaticKVCache(model.backend, model.config, 2, 32, model.dtype, model.parallel)
    a, b = CachedSeq(cache, spacer=cache_kind == "paged"), CachedSeq(cache)
    rows = [run_step(model, [(a, PROMPT_A)])]
    rows.append(run_step(model, [(b, PROMPT_B), (a, [int(rows[-1][0].argmax())])]))
    for _ in range(DECODES):
        last = rows[-1]
        rows.append(run_step(model, [(a, [int(last[1].argmax())]), (b, [int(last[0].argmax())])]))
    return np.concatenate(rows)


def generate(model_dir: str) -> list[list[int]]:
    """Greedy tokens of :data:`LLM_PROMPTS` through ``LLM`` (under mpiexec: rank 0 only gets here)."""
    with LLM(model_dir, backend="cpu", max_model_len=64, block_size=4) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in LLM_PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outputs]


def main() -> None:
    from infinilm_nb.backend import get_backend
    from infinilm_nb.runtime.distributed import CommunicationGroup, RankInfo, install_abort_on_error
    from infinilm_nb.runtime.llama import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--models", nargs="*", default=[])
    parser.add_argument("--llm", default=None)
    args = parser.parse_args()
    info = RankInfo.detect()
    install_abort_on_error(info)
    backend = get_backend("cpu")
    group = CommunicationGroup(info, backend)
    results = {}
    for index, model_dir in enumerate(args.models):
        model = load_model(model_dir, backend, progress=False, group=group)
        for kind in ("paged", "static"):
            results[f"{index}/{kind}"] = script(model, kind)
    if args.llm:
        results["llm"] = np.array(generate(args.llm))  # ranks > 0 end inside LLM(...)
    if info.rank == 0:
        np.savez(args.out, **results)


if __name__ == "__main__":
    main()
