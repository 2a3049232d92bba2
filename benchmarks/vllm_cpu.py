"""The vLLM plugin against stock vLLM on the CPU: SmolLM2, the OpenAI server, one workload.

Two servers of the same vLLM build, one after the other, on 127.0.0.1:

* **plugin** — the lazyattention scheduler, worker and request guard
  (:func:`~lazyattention.integrations.vllm.engine_args`); each request *names* its
  documents (``vllm_xargs``), which the server caches once and places anywhere;
* **stock** — vLLM's own CPU attention with prefix caching; each request carries its
  documents' text at the head of its prompt, in the request's order.

The workload: 6 passages of the generated 2Wiki-like set (about 100–300 tokens each);
8 clients send 10 requests each at once, every request naming 2–4 passages in a random
order, then a question; 16 new tokens, greedy. Both servers first serve one warm-up pass
of the same kind (the plugin learns the passages, stock vLLM fills its prefix cache); the
timed pass draws **new** random orders, so neither server sees a replay. Then one stream
decodes 64 tokens (EOS ignored): decode tokens per second = 63 / (time of 64 − time of 1).

Targets, printed PASS or MISS: decode tokens/s at one stream ≥ stock's; throughput ≥ 1.5×
stock's; p50 latency ≤ 0.7× stock's.

Run it in the vLLM environment (``make test-vllm`` builds ``.venv-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_cpu.py --name vllm_cpu

It writes ``benchmarks/results/vllm_cpu.json``. ``--clients 2 --requests 2 --new-tokens 4``
makes a short smoke run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = 32  # vLLM's CPU attention takes multiples of 32
STARTUP_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    """A vLLM OpenAI server in its own process group, stopped on exit."""

    def __init__(self, model: Path, plugin: bool, log: Path):
        self.port = free_port()
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "4096",
            "--enable-prefix-caching", "--kv-cache-memory-bytes", str(1 << 30),
        ]  # fmt: skip
        env = dict(os.environ)
        if plugin:
            from lazyattention.integrations.vllm import engine_args

            args = engine_args()
            command += [
                "--scheduler-cls", args["scheduler_cls"], "--worker-cls", args["worker_cls"],
                "--logits-processors", *args["logits_processors"],
                "--middleware", "lazyattention.integrations.vllm.middleware.LazyGuard",
            ]  # fmt: skip
        else:
            env["VLLM_PLUGINS"] = ""  # stock vLLM: no plugin loaded at all
        self.log = log
        self.out = open(log, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            command, stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the server did not come up in {STARTUP_S} s") from None
                time.sleep(2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=60)
        self.out.close()


def passages(count: int) -> list[str]:
    from lazyattention.integrations.transformers.qa import wiki_set

    return list(wiki_set(1, split="heldout", seed=21, passages=count)[0].documents)


def workload(docs: list[str], clients: int, per_client: int, seed: int) -> list[list[tuple[list[int], str]]]:
    """Per client, its requests: (passage indices in order, question)."""
    rng = random.Random(seed)
    questions = [f"What does passage {i + 1} say about its subject?" for i in range(len(docs))]
    return [
        [(rng.sample(range(len(docs)), rng.randint(2, 4)), rng.choice(questions)) for _ in range(per_client)]
        for _ in range(clients)
    ]


def body(model: str, docs: list[str], order: list[int], question: str, plugin: bool, new_tokens: int) -> dict:
    tail = f"\n\nQuestion: {question}\nAnswer:"
    request = {"model": model, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
    if plugin:
        named = [{"id": f"passage-{i}"} for i in order]
        request["prompt"] = tail
        request["vllm_xargs"] = {"lazyattention": json.dumps({"documents": named})}
    else:
        request["prompt"] = "\n\n".join(docs[i] for i in order) + tail
    return request


def serve_pass(port, model, docs, plan, plugin: bool, new_tokens: int) -> list[float]:
    """Every client's requests, clients in parallel; each request's latency in seconds."""

    def client(requests):
        latencies = []
        for order, question in requests:
            began = time.perf_counter()
            post(port, body(model, docs, order, question, plugin, new_tokens))
            latencies.append(time.perf_counter() - began)
        return latencies

    with ThreadPoolExecutor(len(plan)) as pool:
        return [t for ts in pool.map(client, plan) for t in ts]


def decode_rate(port, model, docs, plugin: bool) -> float:
    """Tokens per second of one stream's decode: 63 / (time of 64 tokens − time of 1)."""
    order, question = [0, 1, 2], "What is the first passage about?"
    timings = {}
    for n in (1, 64, 1, 64):
        began = time.perf_counter()
        post(port, body(model, docs, order, question, plugin, n))
        timings.setdefault(n, []).append(time.perf_counter() - began)
    return 63 / (min(timings[64]) - min(timings[1]))


def measure(model: Path, plugin: bool, docs: list[str], args, logdir: Path) -> dict:
    server = Server(model, plugin, logdir / f"{'plugin' if plugin else 'stock'}.log")
    try:
        name = str(model)
        if plugin:  # the passages are given once, by id, with their text
            for i, doc in enumerate(docs):
                given = {"lazyattention": json.dumps({"documents": [{"id": f"passage-{i}", "text": doc}]})}
                post(server.port, {"model": name, "prompt": "Hi", "max_tokens": 1, "vllm_xargs": given})
        serve_pass(server.port, name, docs, workload(docs, args.clients, 2, seed=1), plugin, args.new_tokens)
        plan = workload(docs, args.clients, args.requests, seed=2)
        began = time.perf_counter()
        latencies = serve_pass(server.port, name, docs, plan, plugin, args.new_tokens)
        seconds = time.perf_counter() - began
        return {
            "requests": len(latencies),
            "seconds": seconds,
            "requests_per_s": len(latencies) / seconds,
            "p50_latency_s": statistics.median(latencies),
            "decode_tokens_per_s": decode_rate(server.port, name, docs, plugin),
        }
    finally:
        server.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=10, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--name", default=None, help="write benchmarks/results/NAME.json")
    args = parser.parse_args(argv)

    import vllm

    from lazyattention.integrations.transformers.pretrained import prepare_smollm2

    model = prepare_smollm2(progress=False)
    docs = passages(args.passages)
    with tempfile.TemporaryDirectory() as logs:
        stock = measure(model, False, docs, args, Path(logs))
        plugin = measure(model, True, docs, args, Path(logs))
    checks = [
        ("decode tokens/s at one stream ≥ stock's", plugin["decode_tokens_per_s"] / stock["decode_tokens_per_s"], 1.0),
        ("throughput ≥ 1.5× stock's", plugin["requests_per_s"] / stock["requests_per_s"], 1.5),
        ("p50 latency ≤ 0.7× stock's", stock["p50_latency_s"] / plugin["p50_latency_s"], 1 / 0.7),
    ]
    result = {
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "date": datetime.date.today().isoformat(),
        "versions": {"vllm": vllm.__version__, "python": platform.python_version()},
        "workload": vars(args),
        "stock": stock,
        "plugin": plugin,
        "targets": [{"target": name, "value": ratio, "pass": ratio >= bar} for name, ratio, bar in checks],
    }
    print(f"{'server':<8} {'req/s':>7} {'p50 s':>7} {'decode tok/s':>13}")
    for name in ("stock", "plugin"):
        r = result[name]
        print(f"{name:<8} {r['requests_per_s']:7.2f} {r['p50_latency_s']:7.2f} {r['decode_tokens_per_s']:13.1f}")
    for t in result["targets"]:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['value']:.2f}")
    if args.name:
        path = RESULTS / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
