"""The model runner: one copy per step, host-side checks, CUDA-graph decode.

* On every device: a runner step (packed into one buffer, checked once on the host)
  computes exactly what the model computes from the step moved tensor by tensor; a
  decode step padded to its CUDA-graph bucket (what a capture records, run eagerly)
  gives the same logits and leaves every block but the scratch block as it was; bad
  step values are refused before any layer runs.
* With CUDA and the fast backend (the GPU suite): graph replay gives the eager
  runner's tokens for several batch sizes, and neither a prefill step nor a decode
  step synchronises the host inside its forward.

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
from lazyattention.serving.runner import ModelRunner, graph_bucket

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
    """A runner that keeps every step it ran (host tensors) with a copy of the cache
    before the step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def run(self, token_ids, step):
        before = ([k.clone() for k in self.cache.k], [v.clone() for v in self.cache.v])
        logits = super().run(token_ids, step)
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


def test_graph_buckets():
    assert graph_bucket(1, 1) == (1, 16)
    assert graph_bucket(3, 16) == (4, 16)
    assert graph_bucket(16, 17) == (16, 32)
    assert graph_bucket(17, 130) == (32, 256)
    with pytest.raises(ValueError, match="batch >= 1"):
        graph_bucket(0, 4)


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
def test_no_host_synchronisation_inside_a_step(graphs):
    """``torch.cuda.set_sync_debug_mode("error")`` around a prefill step and a decode
    step (after a warm-up that compiles the kernels and fills the RoPE tables)."""
    model = _model("fast", torch.float32, "cuda")
    engine = Engine(model, "block_attention", num_blocks=160, block_size=8)
    engine.runner = _Recorder(model, engine.cache, cuda_graphs=graphs)
    _serve(engine)
    prefill = next(x for x in engine.runner.steps if x[1].prefill is not None and x[1].copy_src is not None)
    decode = next(x for x in engine.runner.steps if x[1].prefill is None)
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
def test_shared_decode_beside_graph_replay(num_requests):
    """``shared_decode=2``: decode steps whose requests share documents run
    shared-segment decode eagerly, the others replay their graphs; the tokens are those
    of the engine without it."""
    model = _model("fast", torch.float32, "cuda")
    outputs, runners = [], []
    for shared in (None, 2):
        engine = Engine(model, "lazy", num_blocks=160, block_size=8, max_num_seqs=16, shared_decode=shared)
        outputs.append(_serve(engine, num_requests, max_new_tokens=6))
        runners.append(engine.runner)
    assert runners[0].steps_shared == 0 and runners[1].steps_shared > 0
    assert runners[1].steps_replayed > 0  # the first request decodes alone: graphs stay for it
    assert outputs[0] == outputs[1]
