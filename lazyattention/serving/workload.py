"""A retrieval-augmented workload like the paper's, and the serving metrics.

* A pool of documents with token lengths from a log-normal distribution (clipped).
* Zipf popularity: document ``i`` (``i = 0`` most popular) is drawn with probability
  ``∝ (i + 1)^-α``; ``α = 0`` is uniform, ``α ≈ 1`` is the skewed case.
* Each request draws ``k`` distinct documents by popularity, in random order, then a
  query and an output length.
* Arrivals: a Poisson process at ``rate`` requests per second (``inf``: all at 0).

Everything is drawn from one seeded ``torch.Generator``: a seed fixes the workload.
The arrivals are drawn last, so workloads that differ only in ``rate`` hold the same
documents and requests, and a curve against the rate compares like with like.

Metrics (:class:`Metrics`): TTFT p50/p99, TPOT, throughput in requests/s and tokens/s
(each request's document tokens counted once), cache hit ratio (each document of a
request counted once), bytes copied for re-encoding, peak KV blocks. Time is wall
clock; on a GPU every step ends in a device synchronisation (the sampled tokens are
read back), so a step's time is the device's.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch

from .engine import Engine, Request

__all__ = [
    "WorkloadConfig",
    "WorkloadRequest",
    "Workload",
    "Metrics",
    "zipf_probabilities",
    "make_workload",
    "run_workload",
    "summarize",
]


@dataclass(frozen=True)
class WorkloadConfig:
    """What to draw.

    Args:
        num_requests: requests in the workload.
        num_documents: documents in the pool.
        doc_len_mean: mean document length in tokens (log-normal).
        doc_len_sigma: log-normal ``σ`` of the lengths (0: all equal to the mean).
        doc_len_min: lengths are clipped to ``[doc_len_min, doc_len_max]``.
        doc_len_max: see ``doc_len_min``.
        docs_per_request: ``k`` distinct documents per request.
        zipf_alpha: popularity skew ``α`` (0 uniform).
        query_len: query tokens per request.
        output_len: generated tokens per request.
        rate: Poisson arrival rate in requests/s; ``math.inf`` puts every arrival at 0.
        vocab_size: token ids are drawn from ``[1, vocab_size)``.
        seed: the generator's seed.
    """

    num_requests: int = 32
    num_documents: int = 16
    doc_len_mean: int = 64
    doc_len_sigma: float = 0.3
    doc_len_min: int = 8
    doc_len_max: int = 4096
    docs_per_request: int = 3
    zipf_alpha: float = 1.0
    query_len: int = 16
    output_len: int = 8
    rate: float = math.inf
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.docs_per_request <= self.num_documents):
            raise ValueError(
                f"docs_per_request must be in [1, num_documents={self.num_documents}], got {self.docs_per_request}"
            )
        if self.num_requests < 1 or self.query_len < 1 or self.output_len < 1:
            raise ValueError("num_requests, query_len and output_len must be >= 1")
        if not (1 <= self.doc_len_min <= self.doc_len_mean <= self.doc_len_max):
            raise ValueError("need 1 <= doc_len_min <= doc_len_mean <= doc_len_max")
        if self.zipf_alpha < 0 or not self.rate > 0:
            raise ValueError(f"zipf_alpha must be >= 0 and rate > 0, got {self.zipf_alpha}, {self.rate}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")


@dataclass(frozen=True)
class WorkloadRequest:
    """One request: arrival (seconds after the start), query ids, document indices, output length."""

    arrival: float
    query: list[int]
    documents: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class Workload:
    """A drawn workload: the document pool and the requests over it."""

    config: WorkloadConfig
    documents: list[list[int]]
    requests: list[WorkloadRequest]

    def request_documents(self, r: WorkloadRequest) -> list[list[int]]:
        return [self.documents[i] for i in r.documents]

    @property
    def pool_tokens(self) -> int:
        return sum(len(d) for d in self.documents)


def zipf_probabilities(n: int, alpha: float) -> torch.Tensor:
    """``[n]`` float64 probabilities ``∝ (i + 1)^-α``, most popular first."""
    weights = (torch.arange(1, n + 1, dtype=torch.float64)) ** -alpha
    return weights / weights.sum()


def make_workload(cfg: WorkloadConfig) -> Workload:
    """Draw documents, requests and arrivals from ``cfg`` (deterministic in ``cfg.seed``).

    Example:
        >>> w = make_workload(WorkloadConfig(num_requests=4, num_documents=5, docs_per_request=2))
        >>> len(w.requests), len(w.requests[0].documents)
        (4, 2)
    """
    g = torch.Generator().manual_seed(cfg.seed)
    mu = math.log(cfg.doc_len_mean) - cfg.doc_len_sigma**2 / 2  # so the mean is doc_len_mean
    lengths = torch.exp(mu + cfg.doc_len_sigma * torch.randn(cfg.num_documents, generator=g, dtype=torch.float64))
    lengths = lengths.round().clamp(cfg.doc_len_min, cfg.doc_len_max).long().tolist()
    documents = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    popularity = zipf_probabilities(cfg.num_documents, cfg.zipf_alpha)
    drawn = []
    for _ in range(cfg.num_requests):
        chosen = torch.multinomial(popularity, cfg.docs_per_request, replacement=False, generator=g)
        chosen = chosen[torch.randperm(cfg.docs_per_request, generator=g)]  # random order in the prompt
        drawn.append((torch.randint(1, cfg.vocab_size, (cfg.query_len,), generator=g).tolist(), chosen.tolist()))
    # arrivals last, so that a rate changes when the requests come and nothing else
    if math.isinf(cfg.rate):
        arrivals = [0.0] * cfg.num_requests
    else:
        gaps = torch.empty(cfg.num_requests, dtype=torch.float64).exponential_(cfg.rate, generator=g)
        arrivals = (torch.cumsum(gaps, 0) - gaps[0]).tolist()  # the first request arrives at 0
    requests = [
        WorkloadRequest(float(arrival), query, chosen, cfg.output_len)
        for arrival, (query, chosen) in zip(arrivals, drawn, strict=True)
    ]
    return Workload(cfg, documents, requests)


@dataclass(frozen=True)
class Metrics:
    """What a run of a workload measured (times in seconds)."""

    strategy: str
    num_blocks: int
    requests: int
    ttft_p50: float
    ttft_p99: float
    tpot_mean: float
    makespan: float
    requests_per_s: float
    tokens_per_s: float
    hit_ratio: float
    bytes_copied: int
    peak_blocks: int
    forward_tokens: int
    host_s: float  # the host's work in the engine's steps (EngineStats.host_seconds)
    wait_s: float  # the host blocked on the device's tokens (EngineStats.wait_seconds)

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(values: list[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q)) if values else math.nan


def summarize(engine: Engine, requests: list[Request], start: float) -> Metrics:
    """Metrics of finished ``requests`` served by ``engine`` since ``start``."""
    if any(r.finish_time is None for r in requests):
        raise ValueError("summarize needs finished requests")
    ttft = [r.first_token_time - r.arrival for r in requests]
    tpot = [(r.finish_time - r.first_token_time) / (len(r.output) - 1) for r in requests if len(r.output) > 1]
    makespan = max(r.finish_time for r in requests) - start
    tokens = sum(r.document_tokens + len(r.query) + len(r.output) for r in requests)
    return Metrics(
        strategy=engine.strategy.name,
        num_blocks=engine.pool.num_blocks,
        requests=len(requests),
        ttft_p50=_percentile(ttft, 0.5),
        ttft_p99=_percentile(ttft, 0.99),
        tpot_mean=sum(tpot) / len(tpot) if tpot else math.nan,
        makespan=makespan,
        requests_per_s=len(requests) / makespan,
        tokens_per_s=tokens / makespan,
        hit_ratio=engine.stats.hit_ratio,
        bytes_copied=engine.stats.bytes_copied,
        peak_blocks=engine.stats.peak_blocks,
        forward_tokens=engine.stats.forward_tokens,
        host_s=engine.stats.host_seconds,
        wait_s=engine.stats.wait_seconds,
    )


def run_workload(engine: Engine, workload: Workload, progress=None) -> Metrics:
    """Serve ``workload`` on a fresh ``engine`` in real time and measure it.

    Requests are added when the wall clock reaches their arrival (TTFT counts the
    wait from arrival); when nothing is runnable the loop sleeps until the next one.

    Args:
        engine: a fresh engine (its counters become the run's).
        workload: what to serve.
        progress: called as ``progress(done, total)`` after every step, or ``None``.
    """
    if engine.stats.steps or engine.has_work():
        raise ValueError("run_workload needs a fresh engine (its counters are the run's metrics)")
    pending = deque(sorted(workload.requests, key=lambda r: r.arrival))
    total = len(pending)
    start = time.perf_counter()
    served: list[Request] = []
    finished = 0
    while pending or engine.has_work():
        now = time.perf_counter() - start
        while pending and pending[0].arrival <= now:
            spec = pending.popleft()
            served.append(
                engine.add_request(
                    spec.query, workload.request_documents(spec), spec.max_new_tokens, start + spec.arrival
                )
            )
        if not engine.has_work():
            time.sleep(max(0.0, pending[0].arrival - now))
            continue
        finished += len(engine.step())
        if progress is not None:
            progress(finished, total)
    return summarize(engine, served, start)
