"""Decode steps on persistent buffers (DecodeGraphs) against eager steps.

On the kernel backend (the GPU, else numba's simulator) and the cpu backend the same code runs; on the
GPU each bucket is a captured CUDA graph, elsewhere its body runs eagerly. The GPU-only tests compare
graphed and eager decoding end to end through the LLM.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from infinilm_nb import LLM, SamplingParams
from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.batch import SamplingArrays
from infinilm_nb.runtime.cache import PagedKVCache, StaticKVCache
from infinilm_nb.runtime.graphs import DecodeGraphs, PackedArrays, decode_buckets
from infinilm_nb.runtime.llama import load_model
from tests.conftest import ON_GPU
from tests.helpers import pick, rel_err
from tests.runtime.hf_models import TINIEST, save_tiny_model
from tests.runtime.steps import CachedSeq, make_step

# On the GPU the prompts outgrow one attention partition (256 keys): split-context attention and merge.
PROMPT_LEN = pick(sim=5, gpu=300)
MAX_LEN = pick(sim=64, gpu=1024)
# (backend, cache) pairs: the simulator, slow, runs one
CASES = [("cpu", "paged"), ("cpu", "static"), ("kernel", "paged")] + pick(sim=[], gpu=[("kernel", "static")])


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(2) == [1, 2]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(32) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        decode_buckets(0)


def test_packed_arrays_are_separate_aligned_views():
    cpu = get_backend("cpu")
    packed = PackedArrays(cpu, {"a": ((3,), np.int32), "b": ((2, 5), np.float32), "seeds": ((3,), np.uint64)})
    for i, name in enumerate(("a", "b", "seeds")):
        packed.host[name][...] = i + 1
    packed.upload()
    assert packed.device["a"].tolist() == [1, 1, 1]
    assert packed.device["b"].shape == (2, 5) and np.all(packed.device["b"] == 2)
    assert packed.device["seeds"].dtype == np.uint64 and np.all(packed.device["seeds"] == 3)
    assert packed.device["seeds"].ctypes.data % 8 == 0


def sampling_for(batch: int) -> SamplingArrays:
    """Greedy even rows, seeded top-k / top-p sampling on odd rows."""
    odd = np.arange(batch) % 2 == 1
    return SamplingArrays(
        np.where(odd, 0.8, 0.0).astype(np.float32),
        np.where(odd, 5, 0).astype(np.int32),
        np.where(odd, 0.9, 1.0).astype(np.float32),
        (np.arange(batch, dtype=np.uint64) * np.uint64(7919) + np.uint64(11)),
    )


def make_cache(model, kind: str):
    if kind == "paged":
        return PagedKVCache(model.backend, model.config, pick(48, 512), pick(4, 16), model.dtype)
    return StaticKVCache(model.backend, model.config, 8, MAX_LEN, model.dtype)


@pytest.fixture(scope="module")
def graph_model_dir(tmp_path_factory):
    sizes = {"max_position_embeddings": MAX_LEN} if ON_GPU else dict(TINIEST, max_position_embeddings=MAX_LEN)
    return save_tiny_model(tmp_path_factory.mktemp("graphs"), "llama", tokenizer=False, **sizes)


@pytest.mark.parametrize("backend_name, cache_kind", CASES)
def test_decode_matches_eager_forward(kb, graph_model_dir, backend_name, cache_kind):
    """Batches of 1, 3 (padded to a bucket of 4) and 8 sequences: the same logits and tokens as an
    eager step with the sampler on its logits. On the GPU the decode replays CUDA graphs."""
    backend = kb if backend_name == "kernel" else get_backend("cpu")
    model = load_model(graph_model_dir, backend, dtype=np.float32, progress=False)
    cache = make_cache(model, cache_kind)
    graphs = DecodeGraphs(model, cache, max_num_seqs=8, max_model_len=MAX_LEN)
    assert graphs.buckets == [1, 2, 4, 8] and graphs.captured == (backend.on_gpu)
    vocab = model.config.vocab_size
    batches = [1, 3, 8] if backend.name != "sim" else [3]
    seqs = [CachedSeq(cache, spacer=cache_kind == "paged") for _ in range(batches[-1])]
    prompts = [[(5 * i + 3 * j) % vocab for j in range(PROMPT_LEN + i)] for i in range(len(seqs))]
    model.forward(make_step(list(zip(seqs, prompts))).to(backend), cache)  # one eager prefill of them all
    for batch in batches:
        step = make_step([(seq, [(11 * b + 1) % vocab]) for b, seq in enumerate(seqs[:batch])])
        sampling = sampling_for(batch)
        assert graphs.fits(step) and graphs.bucket_size(batch) == (4 if batch == 3 else batch)
        eager = model.forward(step.to(backend), cache)
        want = backend.xp.empty(batch, dtype=np.int32)
        backend.ops.sample(eager, *sampling.to(backend), want)
        got = graphs.decode(step, sampling)
        assert got.tolist() == backend.to_host(want).tolist()
        assert rel_err(backend.to_host(graphs.last_logits), backend.to_host(eager)) < 1e-5


def test_fits_only_decode_steps_without_hooks(graph_model_dir):
    cpu = get_backend("cpu")
    model = load_model(graph_model_dir, cpu, progress=False)
    cache = make_cache(model, "paged")
    graphs = DecodeGraphs(model, cache, max_num_seqs=4, max_model_len=16)
    a, b = CachedSeq(cache), CachedSeq(cache)
    assert not graphs.fits(make_step([(a, [1, 2, 3])]))  # a prefill
    assert not graphs.fits(make_step([(a, [4]), (b, [5, 6])]))  # a mixed step
    assert graphs.fits(make_step([(a, [7]), (b, [8])]))
    assert not graphs.fits(make_step([(CachedSeq(cache), [1]) for _ in range(5)]))  # above the largest bucket
    long = CachedSeq(cache)
    long.length = 16  # a block table wider than max_model_len needs
    assert not graphs.fits(make_step([(long, [1])]))
    handle = model.hooks.register("logits", lambda name, t: None)
    assert not graphs.fits(make_step([(a, [9])]))
    handle.remove()
    assert graphs.fits(make_step([(a, [10])]))


def prefilled(backend, model_dir, rows: int, max_num_seqs: int, prompt: list[int]):
    """(model, cache, graphs, seqs): ``rows`` sequences whose prompts ``[3 + i, *prompt]`` are in the
    paged cache, and decode graphs of up to ``max_num_seqs`` rows over 16 positions."""
    model = load_model(model_dir, backend, progress=False)
    cache = make_cache(model, "paged")
    graphs = DecodeGraphs(model, cache, max_num_seqs=max_num_seqs, max_model_len=16)
    seqs = [CachedSeq(cache) for _ in range(rows)]
    model.forward(make_step([(seq, [3 + i, *prompt]) for i, seq in enumerate(seqs)]).to(backend), cache)
    return model, cache, graphs, seqs


def test_followers_decode_greedy_without_sampling(graph_model_dir):
    _, _, graphs, seqs = prefilled(get_backend("cpu"), graph_model_dir, 3, 4, [4, 5])
    graphs.decode(make_step([(seq, [6]) for seq in seqs]), sampling_for(3))  # sampled rows fill the buffers
    step = make_step([(seq, [7]) for seq in seqs[:2]])
    tokens = graphs.decode(step)
    assert tokens.tolist() == graphs.last_logits.argmax(axis=-1).tolist()


def test_a_smaller_step_resets_what_a_larger_one_left(graph_model_dir):
    """4 rows with 3-block tables, then 3 rows with 1-block tables in the same bucket: the fourth row
    is padding again and no table keeps the old blocks."""
    cpu = get_backend("cpu")
    model = load_model(graph_model_dir, cpu, progress=False)
    cache = PagedKVCache(cpu, model.config, 32, 4, model.dtype)
    graphs = DecodeGraphs(model, cache, max_num_seqs=4, max_model_len=16)
    seqs = [CachedSeq(cache, spacer=True) for _ in range(4)]
    prompts = [list(range(3, 12 if i == 0 else 5)) for i in range(len(seqs))]
    model.forward(make_step(list(zip(seqs, prompts))).to(cpu), cache)
    graphs.decode(make_step([(seq, [1]) for seq in seqs]))
    step = make_step([(seq, [2]) for seq in seqs[1:]])
    want = model.forward(step.to(cpu), cache).argmax(axis=-1)
    assert graphs.decode(step).tolist() == want.tolist()
    host = graphs._buckets[4].inputs.host
    assert (host["token_ids"][3], host["slot_mapping"][3], host["context_lens"][3]) == (0, -1, 1)
    assert host["block_tables"][:3, 0].tolist() == step.block_tables[:, 0].tolist()
    assert not host["block_tables"][:, 1:].any() and host["block_tables"][3, 0] == 0


def test_released_graphs_decode_eagerly_with_the_same_tokens(kb, graph_model_dir):
    """release() (before a tensor-parallel LLM frees its NCCL communicator) drops every graph; later
    steps run the same body eagerly."""
    model, cache, graphs, seqs = prefilled(kb, graph_model_dir, 2, 2, [4])
    assert graphs.captured == kb.on_gpu
    step = make_step([(seq, [5 + i]) for i, seq in enumerate(seqs)])
    want = kb.to_host(model.forward(step.to(kb), cache)).argmax(axis=-1)
    graphs.release()
    assert not graphs.captured
    assert graphs.decode(step).tolist() == want.tolist()


def test_a_step_fed_by_the_previous_one_takes_its_tokens(graph_model_dir):
    """launch(..., feed=previous): the token ids come from the previous step's samples, not the host."""
    cpu = get_backend("cpu")
    model, cache, graphs, seqs = prefilled(cpu, graph_model_dir, 2, 4, [4])
    first = graphs.launch(make_step([(seq, [5 + i]) for i, seq in enumerate(seqs)]))
    sampled = graphs.wait(first)
    wrong = make_step([(seq, [9]) for seq in seqs])  # token ids the feed must override
    fed = graphs.wait(graphs.launch(wrong, feed=first))
    for seq in seqs:
        seq.length -= 1  # the same position again, with the sampled tokens given by the host
    want = model.forward(make_step([(seq, [int(t)]) for seq, t in zip(seqs, sampled)]).to(cpu), cache).argmax(axis=-1)
    assert fed.tolist() == want.tolist()
    with pytest.raises(ValueError, match="launch: feed must be a launched step of the same 3 rows, got one of 2"):
        graphs.launch(make_step([(CachedSeq(cache), [1]) for _ in range(3)]), feed=first)


def test_enforce_eager_turns_graphs_off(llama_dir: Path):
    eager = LLM(llama_dir, backend="cpu", max_model_len=64, max_num_seqs=4, enforce_eager=True)
    assert eager.engine.graphs is None
    graphed = LLM(llama_dir, backend="cpu", max_model_len=64, max_num_seqs=4)
    assert graphed.engine.graphs.buckets == [1, 2, 4]


PROMPTS = [[(7 * i + 3 * j) % 290 + 3 for j in range(n)] for i, n in enumerate([1, 9, 4, 23, 2, 13, 6, 17])]
PARAMS = [
    SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=1234, ignore_eos=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["paged", "static"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_graphed_llm_equals_eager_llm_on_gpu(llama_dir: Path, cache: str, batch: int):
    """Greedy and seeded requests give the same tokens with CUDA graphs (3 pads a bucket of 4) and without."""
    outputs = {}
    for eager in (True, False):
        llm = LLM(llama_dir, backend="cuda", dtype="float32", cache=cache, max_num_seqs=8, max_model_len=128,
                  num_blocks=64 if cache == "paged" else None, enforce_eager=eager)
        assert (llm.engine.graphs is None) == eager and (eager or llm.engine.graphs.captured)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS[:batch]]
        outputs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, [PARAMS[i % 2] for i in range(batch)])]
        del llm
    assert outputs[False] == outputs[True]


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["paged", "static"])
def test_async_scheduling_equals_step_by_step_on_gpu(llama_dir: Path, cache: str):
    """Steps launched ahead on the GPU (token ids fed on the device, pinned buffers reused behind the
    stream) give the step-by-step tokens, greedy and seeded, with requests stopping at different lengths."""
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0 if i % 2 else 0.9, seed=i, top_k=40,
                             ignore_eos=True) for i in range(len(PROMPTS))]
    outputs = {}
    for ahead in (False, True):
        llm = LLM(llama_dir, backend="cuda", dtype="float32", cache=cache, max_num_seqs=8, max_model_len=128,
                  block_size=16, num_blocks=64 if cache == "paged" else None, async_scheduling=ahead)
        outputs[ahead] = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
        assert (llm.engine.steps_ahead > 0) == ahead
        del llm
    assert outputs[True] == outputs[False]


@pytest.mark.gpu
def test_launch_returns_before_its_step_is_done_on_gpu(graph_model_dir):
    """launch() only enqueues: behind a 0.2 s kernel on the same stream the step is still pending when
    launch returns (a blocking token download would wait it out), and wait() then gives its tokens."""
    import cupy
    from numba import cuda

    @cuda.jit
    def spin(microseconds):
        for _ in range(microseconds):
            cuda.nanosleep(1000)

    backend = get_backend("cuda")
    model, cache, graphs, seqs = prefilled(backend, graph_model_dir, 2, 2, [4])
    step = make_step([(seq, [5 + i]) for i, seq in enumerate(seqs)])
    want = graphs.decode(step)  # the same step runs again below: it stores the same K and V
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        spin[1, 1, cuda.external_stream(stream.ptr)](200_000)
        launched = graphs.launch(step)
        assert not launched.done.done  # CuPy: whether the event has happened
        assert graphs.wait(launched).tolist() == want.tolist()


@pytest.mark.gpu
def test_graphed_float16_decode_close_to_eager(graph_model_dir):
    """float16 through graphs: logits within float16 error of the eager step's."""
    cuda = get_backend("cuda")
    model = load_model(graph_model_dir, cuda, dtype=np.float16, progress=False)
    cache = make_cache(model, "paged")
    graphs = DecodeGraphs(model, cache, max_num_seqs=8, max_model_len=MAX_LEN)
    seqs = [CachedSeq(cache, spacer=True) for _ in range(5)]
    prompts = [[(3 * i + j) % 64 for j in range(PROMPT_LEN)] for i in range(len(seqs))]
    model.forward(make_step(list(zip(seqs, prompts))).to(cuda), cache)
    step = make_step([(seq, [b + 1]) for b, seq in enumerate(seqs)])
    eager = cuda.to_host(model.forward(step.to(cuda), cache))
    graphs.decode(step, sampling_for(5))
    assert rel_err(cuda.to_host(graphs.last_logits).astype(np.float32), eager) < 1e-2


@pytest.mark.gpu
def test_every_kernel_of_float16_decoding_awaits_the_kernels_before_it(llama_dir: Path, monkeypatch):
    """Every numba kernel of a float16 generate (short prompts, eager prefill, graphed decode) calls
    await_previous_kernels, so common.launch launches each programmatically, overlapping the one before."""
    from infinilm_nb.kernels import common

    real = common._awaits_previous_kernels
    checked, plain = set(), set()

    def spy(kernel):
        checked.add(kernel.py_func.__qualname__)
        if not real(kernel):
            plain.add(kernel.py_func.__qualname__)
        return real(kernel)

    monkeypatch.setattr(common, "PDL", True)
    monkeypatch.setattr(common, "_awaits_previous_kernels", spy)
    llm = LLM(llama_dir, backend="cuda", dtype="float16", max_num_seqs=4, max_model_len=128, num_blocks=64)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:3]], PARAMS[1])
    del llm
    assert len(checked) >= 6 and not plain, (sorted(checked), sorted(plain))


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["paged", "static"])
def test_programmatic_launch_gives_the_tokens_of_plain_launches_on_gpu(llama_dir: Path, monkeypatch, cache: str):
    """float16 graphed decoding with INFINILM_NB_PDL's switch on and off: the same tokens."""
    from infinilm_nb.kernels import common

    outputs = {}
    for pdl in (False, True):
        monkeypatch.setattr(common, "PDL", pdl)
        llm = LLM(llama_dir, backend="cuda", dtype="float16", cache=cache, max_num_seqs=8, max_model_len=128,
                  num_blocks=64 if cache == "paged" else None)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        outputs[pdl] = [o.outputs[0].token_ids for o in llm.generate(prompts, [PARAMS[i % 2] for i in range(8)])]
        del llm
    assert outputs[True] == outputs[False]


@pytest.mark.gpu
@pytest.mark.parametrize("switch,module,op,per_layer", [
    ("NORM_IN_GEMM", "norm", "rms_norm", 2),  # the RMSNorms before QKV and gate-up
    ("ROPE_IN_GEMM", "rope", "rope_store_kv", 1),  # RoPE and the K/V store after QKV
])
def test_float16_decode_does_in_the_gemms_what_kernels_did_between_them(
    graph_model_dir, monkeypatch, switch, module, op, per_layer
):
    """A float16 decode step runs neither an RMSNorm before QKV and gate-up (their GEMMs normalise the
    residual themselves) nor RoPE after QKV (its epilogue rotates q and k and stores k and v); with
    the GEMMs' switch off those kernels run, ``per_layer`` a layer, and the logits agree within
    float16 error. On CUDA cores only (INFINILM_NB_TENSOR_CORES=0) the kernels run either way."""
    from infinilm_nb.kernels import gemm

    cuda = get_backend("cuda")
    model = load_model(graph_model_dir, cuda, dtype=np.float16, progress=False)
    cache = make_cache(model, "paged")
    seqs = [CachedSeq(cache, spacer=True) for _ in range(3)]
    prompts = [[(5 * i + j) % 64 for j in range(PROMPT_LEN)] for i in range(len(seqs))]
    model.forward(make_step(list(zip(seqs, prompts))).to(cuda), cache)
    step = make_step([(seq, [b + 2]) for b, seq in enumerate(seqs)]).to(cuda)
    owner = getattr(gemm, module)
    real, calls = getattr(owner, op), []
    monkeypatch.setattr(owner, op, lambda *args: calls.append(args) or real(*args))
    logits = {}
    for in_gemm in (True, False):
        monkeypatch.setattr(gemm, switch, in_gemm)
        calls.clear()
        logits[in_gemm] = cuda.to_host(model.forward(step, cache))  # the same K and V stored again
        assert len(calls) == (0 if in_gemm and gemm.USE_MMA else per_layer * len(model.layers))
    assert rel_err(logits[True], logits[False]) < 1e-2
