"""The model runner: one copy per step, host-side checks, CUDA-graph decode.

* On every device: a runner step (packed into one buffer, checked once on the host)
  computes exactly what the model computes from the step moved tensor by tensor; a
  decode step padded to its CUDA-graph bucket (what a capture records, run eagerly)
  gives the same logits and leaves every block but the scratch block as it was; bad
  step values are refused before any layer runs.
* Shared-segment decode (fast backend; under the interpreter without CUDA): a step
  with shared segments, run eagerly or padded to its graph's bucket (the sharing
  metadata in fixed shapes, tokens carried from the device), gives the per-request
  decode's logits, and the sharing plan is built once while the batch stays the same.
* With CUDA and the fast backend (the GPU suite): graph replay gives the eager
  runner's tokens for several batch sizes, with shared-segment decode too (every
  decode step replayed, none eager); neither a prefill step nor a decode step
  synchronises the host inside its forward; an engine step waits once, for the
  previous step's tokens.

Steps come from real engines (every strategy that writes or copies differently), so
prefills, decodes, Block-Attention copies and the raw cache are all exercised.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lazyattention.reference.layout import BlockMetadata, Layout
from lazyattention.serving.engine import Engine
from lazyattention.serving.model import Model, ModelConfig, StepInputs
from lazyattention.serving.runner import CarriedTokens, ModelRunner, SharedBucket
from lazyattention.steps import graph_bucket

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
CUDA = torch.cuda.is_available()
FAST_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"


def _model(backend="reference", dtype=torch.float64, device="cpu") -> Model:
    cfg = ModelConfig.tiny(vocab_size=VOCAB, num_layers=2)
    return Model(cfg, backend=backend).init_random(0, std=0.1).to(device=device, dtype=dtype)


def _documents():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (21, 9, 16, 40)]


def _serve(engine: Engine, num_requests: int = 3, max_new_tokens: int = 4) -> list[list[int]]:
    docs = _documents()
    engine.generate([5], [docs[3], docs[0]], 1)  # documents cached first, at other offsets
    reqs = []
    for i in range(num_requests):
        reqs.append(engine.add_request([1 + i, 2], [docs[(i + j) % 4] for j in range(3)], max_new_tokens))
        if i == 0:
            engine.step()
            engine.step()  # a decode running when the next requests' prefills come
    engine.run_until_done()
    engine.check_invariants()
    return [r.output for r in reqs]


class _Recorder(ModelRunner):
    """A runner that keeps every step it ran (host tensors, the carried tokens put in)
    with a copy of the cache before the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def run(self, token_ids, step, carried=None):
        before = ([k.clone() for k in self.cache.k], [v.clone() for v in self.cache.v])
        logits = super().run(token_ids, step, carried)
        if carried is not None:
            token_ids = carried.fill(token_ids.to(carried.source.device), carried.rows.to(carried.source.device)).cpu()
        self.steps.append((token_ids.clone(), step, before, logits))
        return logits


def _record(strategy: str, model: Model) -> tuple[Engine, _Recorder]:
    engine = Engine(model, strategy, num_blocks=64, block_size=8)
    engine.runner = _Recorder(model, engine.cache, debug=True)
    _serve(engine)
    return engine, engine.runner


def _restore(cache, before) -> None:
    for dst, src in zip(cache.k + cache.v, before[0] + before[1], strict=True):
        dst.copy_(src)


@pytest.mark.parametrize("strategy", ["lazy", "block_attention", "raw_cache", "recompute"])
def test_a_packed_step_computes_what_the_model_computes(strategy):
    """Packing the step into one int32 buffer (metadata included) changes nothing: the
    logits equal those of the model run on the step moved tensor by tensor."""
    model = _model()
    engine, recorder = _record(strategy, model)
    assert any(s.prefill is not None for _, s, _, _ in recorder.steps), "no prefill step"
    assert any(s.decode is not None for _, s, _, _ in recorder.steps), "no decode step"
    for ids, step, before, logits in recorder.steps:
        _restore(engine.cache, before)
        expected = model(ids, engine.cache, step.to("cpu"))
        assert torch.equal(logits, expected), strategy


@pytest.mark.skipif(not FAST_HERE, reason="the fast backend needs CUDA or TRITON_INTERPRET=1 (see the next test)")
@pytest.mark.parametrize("strategy", ["lazy", "raw_cache"])
def test_a_decode_step_padded_to_its_bucket_is_unchanged(strategy):
    """What a CUDA graph computes (the step padded to its bucket: padding requests in
    the scratch block, block tables padded to M') gives the eager logits, and writes
    nothing outside the scratch block but the step's own slots (fast backend: the
    padding lives in the block metadata its kernels read). The steps are recorded on
    the reference, then replayed through the fast backend in order, so that a bucket's
    buffers are refilled as a graph's are (without CUDA: one step, ``lazy`` only, so
    that the interpreter stays quick)."""
    device = "cuda" if CUDA else "cpu"
    engine, recorder = _record(strategy, _model(dtype=torch.float32))
    fast = _model("fast", torch.float32, device)
    cache = fast.new_cache(engine.pool.num_blocks, engine.block_size)
    runner = ModelRunner(fast, cache, cuda_graphs=False)
    decodes = [x for x in recorder.steps if x[1].prefill is None]
    chosen = {x[1].decode.batch_size: x for x in decodes}
    assert 3 in chosen and 1 in chosen, sorted(chosen)
    b, m = 3, chosen[3][1].decode.metadata().block_table.shape[1]
    assert graph_bucket(b, m) != (b, m)  # the padding is exercised
    scratch = runner.scratch_block
    for ids, step, before, _ in decodes if CUDA else (chosen[3],):
        _restore(cache, [[t.to(device) for t in ts] for ts in before])
        eager = fast(ids.to(device), cache, step.to(device))
        eager_k = [k.clone() for k in cache.k]
        _restore(cache, [[t.to(device) for t in ts] for ts in before])
        padded = runner.padded_decode(ids, step)
        torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)  # split counts differ: rounding only
        for k, e in zip(cache.k, eager_k, strict=True):
            torch.testing.assert_close(k[:scratch], e[:scratch], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(FAST_HERE, reason="the test above runs here")
def test_padded_decode_under_the_interpreter():
    """Without CUDA, the test above in a fresh process with ``TRITON_INTERPRET=1`` (set
    before Triton is imported)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"{__file__}::test_a_decode_step_padded_to_its_bucket_is_unchanged[lazy]",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


@pytest.mark.parametrize("strategy", ["lazy", "block_attention", "prefix_cache"])
def test_host_metadata_equals_the_layouts(strategy):
    """The runner's faster host metadata (segment rows kept across steps) is the
    layout's own, on every layout of a real engine's steps."""
    _, recorder = _record(strategy, _model())
    for _, step, _, _ in recorder.steps:
        for layout in (step.prefill, step.decode):
            if layout is not None:
                fresh = Layout(layout.requests, layout.block_size).metadata()
                built = recorder.host_metadata(layout)
                for name, a, b in zip(BlockMetadata._fields, built, fresh, strict=True):
                    assert a.dtype == b.dtype and torch.equal(a, b), (strategy, name)


def _decode_step(model: Model):
    engine, recorder = _record("lazy", model)
    ids, step, before, _ = next(x for x in recorder.steps if x[1].prefill is None and x[1].decode.batch_size > 1)
    _restore(engine.cache, before)
    return engine, ids, step


def test_bad_step_values_are_refused_on_the_host():
    model = _model()
    engine, ids, step = _decode_step(model)
    runner = ModelRunner(model, engine.cache)
    twice = step.slots.clone()
    twice[1] = twice[0]
    with pytest.raises(ValueError, match="slots must be distinct"):
        runner.run(ids, StepInputs(twice, step.positions, decode=step.decode))
    far = step.positions.clone()
    far[0] = 2**31
    with pytest.raises(ValueError, match="positions must lie in"):
        runner.run(ids, StepInputs(step.slots, far, decode=step.decode))
    outside = step.slots.clone()
    outside[0] = engine.cache.num_blocks * engine.cache.block_size
    with pytest.raises(ValueError, match="slots must lie in"):
        runner.run(ids, StepInputs(outside, step.positions, decode=step.decode))
    with pytest.raises(ValueError, match="token_ids"):
        runner.run(ids[:1], step)
    scratch = step.slots.clone()
    scratch[0] = runner.scratch_block * engine.cache.block_size
    with pytest.raises(ValueError, match="scratch block"):
        runner._check_scratch(StepInputs(scratch, step.positions, decode=step.decode))
    with pytest.raises(ValueError, match="padded_decode needs the fast backend"):
        runner.padded_decode(ids, step)


def test_debug_validates_in_every_layer_and_runs_eagerly(monkeypatch):
    """``debug=True`` hands ``validate=True`` to the layers; by default they get
    ``False`` (the runner checked the step)."""
    model = _model()
    engine, ids, step = _decode_step(model)
    seen = []
    write_kv = model.ops.write_kv

    def spy(*args, validate=True):
        seen.append(validate)
        return write_kv(*args, validate=validate)

    monkeypatch.setattr(model.ops, "write_kv", spy)
    ModelRunner(model, engine.cache, debug=True).run(ids, step)
    ModelRunner(model, engine.cache).run(ids, step)
    layers = model.cfg.num_layers
    assert seen == [True] * layers + [False] * layers


@pytest.mark.skipif(not FAST_HERE, reason="the fast backend needs CUDA or TRITON_INTERPRET=1 (see the next test)")
def test_a_shared_decode_step_padded_to_its_bucket_is_unchanged():
    """Steps with shared segments (``shared_decode_min_requests=2``): run eagerly (the
    sharing metadata in fixed shapes) and padded to their graph's bucket (request rows
    and sharing metadata padded, as a capture records; the tokens carried from the
    device), they give the per-request decode's logits, and write only their own
    slots outside the scratch block. Two consecutive steps of one batch: the plan is
    built once (without CUDA: those two steps only, so that the interpreter stays
    quick)."""
    device = "cuda" if CUDA else "cpu"
    engine, recorder = _record("lazy", _model(dtype=torch.float32))
    fast = _model("fast", torch.float32, device)
    cache = fast.new_cache(engine.pool.num_blocks, engine.block_size)
    runner = ModelRunner(fast, cache, cuda_graphs=False, shared_decode_min_requests=2)
    threes = [x for x in recorder.steps if x[1].prefill is None and x[1].decode.batch_size == 3]
    assert len(threes) >= 2
    scratch = runner.scratch_block
    for ids, step, before, _ in threes if CUDA else threes[:2]:
        _restore(cache, [[t.to(device) for t in ts] for ts in before])
        eager = fast(ids.to(device), cache, step.to(device))  # the per-request decode
        eager_k = [k.clone() for k in cache.k]
        _restore(cache, [[t.to(device) for t in ts] for ts in before])
        torch.testing.assert_close(runner.run(ids, step), eager, rtol=1e-4, atol=1e-4)
        _restore(cache, [[t.to(device) for t in ts] for ts in before])
        carried = CarriedTokens(torch.arange(3), ids.to(device))  # every token from the device
        padded = runner.padded_decode(torch.zeros_like(ids), step, carried)
        torch.testing.assert_close(padded, eager, rtol=1e-4, atol=1e-4)
        for k, e in zip(cache.k, eager_k, strict=True):
            torch.testing.assert_close(k[:scratch], e[:scratch], rtol=1e-4, atol=1e-4)
    steps = len(threes) if CUDA else 2
    assert runner.steps_shared == 2 * steps and runner.steps_eager == steps
    assert runner.plans_built == 1  # kept across the steps of one batch
    ((_, rows, _, bucket),) = [k for k in runner._padded if k[0]]
    assert rows == 4 and isinstance(bucket, SharedBucket)  # a padding request, and its empty slots


@pytest.mark.skipif(FAST_HERE, reason="the test above runs here")
def test_shared_decode_padded_under_the_interpreter():
    """Without CUDA, the test above in a fresh process with ``TRITON_INTERPRET=1``."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    test = f"{__file__}::test_a_shared_decode_step_padded_to_its_bucket_is_unchanged"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]


def test_compiled_norms_and_mlps_give_the_eager_tokens():
    """``compile_backend`` (here ``"eager"``: dynamo's capture alone, quick on a CPU;
    the GPU suite runs ``"inductor"`` below): the norms and MLPs run compiled, one
    graph for every token count, and the engine gives the eager tokens and first-token
    logits."""
    from torch._dynamo.utils import counters

    runs = []
    for backend in (None, "eager"):
        model = _model()  # a fresh one: compiling is in place
        engine = Engine(model, "lazy", num_blocks=64, block_size=8, keep_logits=True, compile_backend=backend)
        frames = counters["frames"]["ok"]
        outputs = _serve(engine)
        assert (counters["frames"]["ok"] > frames) == (backend is not None)
        runs.append((outputs, [r.first_logits for r in engine.finished]))
    (eager, eager_logits), (compiled, compiled_logits) = runs
    assert compiled == eager
    for a, b in zip(compiled_logits, eager_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cuda_graphs_only_for_the_fast_backend_on_cuda():
    model = _model()
    cache = model.new_cache(8, 4)
    assert ModelRunner(model, cache).cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs=True needs the fast backend on a CUDA device"):
        ModelRunner(model, cache, cuda_graphs=True)
    assert cache.num_blocks == 9  # the scratch block after the pool's 8


# --------------------------------------------------------------------------- fast backend


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("strategy", ["lazy", "raw_cache"])
@pytest.mark.parametrize("num_requests", [1, 3, 6, 16])
def test_graph_replay_gives_the_eager_tokens(strategy, num_requests):
    """Decode-only steps replayed from CUDA graphs (fast backend) give the tokens of the
    same engine run eagerly, and their logits within float32 rounding."""
    model = _model("fast", torch.float32, "cuda")
    outputs = []
    for graphs in (False, True):
        engine = Engine(model, strategy, num_blocks=160, block_size=8, max_num_seqs=16, keep_logits=True)
        engine.runner = ModelRunner(model, engine.cache, cuda_graphs=graphs)
        outputs.append(_serve(engine, num_requests, max_new_tokens=6))
        if graphs:
            assert engine.runner.steps_replayed > 0 and engine.runner.graphs
        else:
            assert engine.runner.steps_replayed == 0
    assert outputs[0] == outputs[1]


@pytest.mark.skipif(not CUDA, reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("shared", [None, 2])
def test_no_host_synchronisation_inside_a_step(graphs, shared):
    """``torch.cuda.set_sync_debug_mode("error")`` around a prefill step and a decode
    step (after a warm-up that compiles the kernels and fills the RoPE tables), with
    shared-segment decode too."""
    model = _model("fast", torch.float32, "cuda")
    engine = Engine(model, "lazy" if shared else "block_attention", num_blocks=160, block_size=8)
    engine.runner = _Recorder(model, engine.cache, cuda_graphs=graphs, shared_decode_min_requests=shared)
    _serve(engine)
    steps = engine.runner.steps
    prefill = next(x for x in steps if x[1].prefill is not None and (shared or x[1].copy_src is not None))
    decode = next(x for x in steps if x[1].prefill is None and (not shared or x[1].decode.batch_size > 1))
    for ids, step, before, _ in (prefill, decode):
        _restore(engine.cache, before)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            engine.runner.run(ids, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("num_requests", [3, 16])
def test_shared_decode_graph_replay_gives_the_eager_tokens(num_requests):
    """``shared_decode_min_requests=2``: decode steps whose requests share documents
    replay their CUDA graphs (shared-segment decode captured with fixed-shape
    metadata) like every other decode step — none runs eagerly — and give the tokens
    of the same engine run eagerly, with and without shared decode."""
    model = _model("fast", torch.float32, "cuda")
    outputs, runners = [], []
    for graphs, threshold in ((False, None), (False, 2), (True, 2)):
        engine = Engine(model, "lazy", num_blocks=160, block_size=8, max_num_seqs=16)
        engine.runner = ModelRunner(model, engine.cache, cuda_graphs=graphs, shared_decode_min_requests=threshold)
        outputs.append(_serve(engine, num_requests, max_new_tokens=6))
        runners.append((engine.runner, engine.stats))
    (plain, _), (eager, _), (replayed, stats) = runners
    assert plain.steps_shared == 0 and eager.steps_shared > 0 and replayed.steps_shared == eager.steps_shared
    assert replayed.shared_graphs and replayed.steps_replayed == stats.decode_steps
    assert replayed.steps_eager == stats.steps - stats.decode_steps  # prefills only
    assert replayed.plans_built < stats.decode_steps  # kept while a batch stays the same
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
def test_inductor_compiled_layers_with_graphs_give_the_eager_tokens():
    """``compile_backend="inductor"`` with CUDA graphs and shared-segment decode: the
    tokens of the eager engine without either."""
    outputs = []
    for options in ({}, {"compile_backend": "inductor", "shared_decode_min_requests": 2}):
        model = _model("fast", torch.float32, "cuda")  # a fresh one: compiling is in place
        engine = Engine(model, "lazy", num_blocks=160, block_size=8, max_num_seqs=16, **options)
        outputs.append(_serve(engine, 6, max_new_tokens=6))
        assert engine.runner.steps_replayed > 0
    assert outputs[0] == outputs[1]


@pytest.mark.skipif(not CUDA, reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("threshold", [None, 2])
def test_an_engine_step_waits_once_for_tokens(threshold, monkeypatch):
    """In steady decode (graphs captured), an engine step synchronises nothing but one
    wait on an event: the previous step's tokens (``set_sync_debug_mode("error")``
    catches every other synchronisation; the event waits are counted)."""
    model = _model("fast", torch.float32, "cuda")
    engine = Engine(model, "lazy", num_blocks=160, block_size=8, max_num_seqs=16, shared_decode_min_requests=threshold)
    docs = _documents()
    for i in range(6):
        engine.add_request([1 + i, 2], [docs[(i + j) % 4] for j in range(3)], 12)
    while engine.waiting or engine.stats.decode_steps < 3:  # admitted, and the decode graphs captured
        engine.step()
    waits = []
    synchronize = torch.cuda.Event.synchronize

    def counted(event):
        waits.append(event)
        return synchronize(event)

    monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            before = len(waits)
            engine.step()
            assert len(waits) - before <= 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.runner.steps_shared > 0 if threshold else engine.runner.steps_shared == 0
    engine.run_until_done()
