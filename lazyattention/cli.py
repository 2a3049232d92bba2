"""The ``lazyattention`` command: parse and check the flags, then dispatch.

``lazyattention demo`` runs :func:`lazyattention.demo.run_demo`; ``lazyattention bench``
runs :func:`lazyattention.bench.run_bench` (whose signature holds the defaults shown by
``--help``). This module only parses, checks and dispatches. Every bad value is
reported before any work starts, as one line that names the flag and the value, with
exit code 2::

    lazyattention bench: error: argument --block-size: must be an integer >= 1, got '0'

An error raised deeper down (a ``ValueError`` or ``RuntimeError`` of the library) is
printed the same way; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import re
import sys

import torch

import lazyattention
from lazyattention.backends import BACKENDS, DEFAULT_BACKENDS, REFERENCE, get_backend, interpreted
from lazyattention.bench import DTYPES, output_paths, run_bench
from lazyattention.demo import run_demo
from lazyattention.serving.config import MODEL_SHAPES
from lazyattention.serving.engine import STRATEGIES

__all__ = ["build_parser", "main", "parse_args"]

#: What ``demo --backend fast --device cpu`` says before it starts: the Triton interpreter
#: runs every kernel instance in Python, so the demo takes many minutes.
INTERPRETED_DEMO = (
    "lazyattention demo: the Triton kernels run under the interpreter (TRITON_INTERPRET=1), one Python call per "
    "kernel instance: this takes many minutes (--backend reference runs the same demo far sooner). "
    "Each part and each answer prints when it is done."
)

#: ``run_bench``'s defaults, shown by ``lazyattention bench --help``.
BENCH_DEFAULTS = {k: p.default for k, p in inspect.signature(run_bench).parameters.items()}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``<prog>: error: <message>``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` except where there is none to show (flags, ``None``)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


# --------------------------------------------------------------------------- value types


def _integer(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer in [{low}, {high}], got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


#: The largest ``--seed``: seeds feed torch generators (64-bit), some as ``seed + 1``.
MAX_SEED = 2**63 - 1


def _number(positive: bool, allow_inf: bool = False):
    """A float that is > 0 (``positive``) or >= 0, finite unless ``allow_inf``."""
    bound = "> 0" if positive else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if math.isnan(value) or (math.isinf(value) and not allow_inf) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"must be a {'' if allow_inf else 'finite '}number {bound}, got {text!r}")
        return value

    return parse


def _numbers(positive: bool):
    """A non-empty comma-separated list of finite numbers, each > 0 or >= 0."""
    one = _number(positive)

    def parse(text: str) -> list[float]:
        items = [x.strip() for x in text.split(",")]
        if not text.strip() or any(not x for x in items):
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers (at least one), got {text!r}")
        try:
            return [one(x) for x in items]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(
                str(exc) if len(items) == 1 else f"every value {exc} (in {text!r})"
            ) from None

    return parse


def _strategies(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {bad[0]!r} in {text!r}; choose from {', '.join(STRATEGIES)}"
        )
    return names


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _file_stem(text: str) -> str:
    if not text or "/" in text or os.sep in text or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"expected a file name stem without a folder, got {text!r}")
    return text


def _csv(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# --------------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lazyattention",
        description="Deferred positional encoding for KV-cache reuse.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {lazyattention.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,check}")
    for name, help_text in (
        ("demo", "show the semantics, document reuse and the strategies side by side"),
        ("bench", "run the workload under every strategy; write a table, JSON and a plot"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        p.add_argument(
            "--backend",
            choices=tuple(BACKENDS),
            default=None,
            help="attention backend: the PyTorch definition (reference), vectorised PyTorch for the CPU "
            "(sdpa), or the Triton kernels (fast: a CUDA GPU, or TRITON_INTERPRET=1 with --device cpu); "
            "default: the device's (sdpa on the CPU, fast on CUDA)",
        )
        p.add_argument(
            "--device",
            type=_device,
            default=None,
            help="cpu, cuda or cuda:N (default: cpu, but cuda for --backend fast unless TRITON_INTERPRET=1)",
        )
        p.add_argument(
            "--seed", type=_integer(0, MAX_SEED), metavar="N", default=0, help="seeds the weights and the data"
        )

    d = BENCH_DEFAULTS
    p = sub.choices["bench"]
    positive = _integer(1)
    p.add_argument("--model", choices=tuple(MODEL_SHAPES), default=d["model"], help="random-weight model shape")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=d["dtype"], help="weights and KV cache dtype")
    p.add_argument("--requests", type=positive, metavar="N", default=d["requests"], help="requests per workload")
    p.add_argument("--documents", type=positive, metavar="N", default=d["documents"], help="documents in the pool")
    p.add_argument("--doc-len", type=positive, metavar="N", default=d["doc_len"], help="mean document length in tokens")
    p.add_argument(
        "--docs-per-request",
        type=positive,
        metavar="N",
        default=d["docs_per_request"],
        help="distinct documents per request",
    )
    p.add_argument("--query-len", type=positive, metavar="N", default=d["query_len"], help="query tokens per request")
    p.add_argument(
        "--output-len", type=positive, metavar="N", default=d["output_len"], help="generated tokens per request"
    )
    p.add_argument(
        "--rate",
        type=_number(positive=True, allow_inf=True),
        metavar="X",
        default=str(d["rate"]),
        help="Poisson arrivals per second (inf: all at once)",
    )
    p.add_argument(
        "--alphas",
        type=_numbers(positive=False),
        metavar="X,...",
        default=_csv(d["alphas"]),
        help="Zipf skews to sweep",
    )
    p.add_argument(
        "--budgets",
        type=_numbers(positive=True),
        metavar="X,...",
        default=_csv(d["budgets"]),
        help="KV budgets to sweep, as fractions of the document pool",
    )
    p.add_argument(
        "--skew", type=_number(positive=False), metavar="X", default=d["skew"], help="Zipf skew of the budget sweep"
    )
    p.add_argument(
        "--budget", type=_number(positive=True), metavar="X", default=d["budget"], help="KV budget of the skew sweep"
    )
    p.add_argument("--block-size", type=positive, metavar="N", default=d["block_size"], help="tokens per KV block")
    p.add_argument(
        "--max-num-seqs", type=positive, metavar="N", default=d["max_num_seqs"], help="requests running at once"
    )
    p.add_argument(
        "--max-batch-tokens",
        type=positive,
        metavar="N",
        default=d["max_batch_tokens"],
        help="prefill tokens per engine step",
    )
    p.add_argument(
        "--strategies", type=_strategies, metavar="NAME,...", default=None, help="comma-separated (default: all)"
    )
    p.add_argument("--out", metavar="FOLDER", default=d["out"], help="folder for the JSON and the plot")
    p.add_argument(
        "--name", type=_file_stem, metavar="STEM", default=d["name"], help="file name stem of the JSON and the plot"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = sub.add_parser(
        "check",
        help="check a backend's properties on this device (Hypothesis)",
        description="check a backend's properties on this device (Hypothesis)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--backend", choices=tuple(BACKENDS), default="fast", help="the backend to check")
    p.add_argument("--profile", choices=("ci", "nightly"), default="ci", help="10 or 200 examples per function")
    p.add_argument("--functions", nargs="+", default=None, help="attention functions to check (default: all)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    return parser


# --------------------------------------------------------------------------- checks


def _fail(command: str, message: str):
    """Exit as argparse does on a bad value: one line, exit code 2."""
    print(f"lazyattention {command}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _resolve_device(command: str, backend: str, device: str | None) -> str:
    """The device to run on: ``--device``, or the CPU where the backend runs there, else CUDA; refuse
    what cannot run."""
    if device is not None and device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if count == 0:
            _fail(command, f"argument --device: {device!r}, but this machine has no CUDA device; use --device cpu")
        if index >= count:
            _fail(
                command,
                f"argument --device: {device!r}, but this machine has {count} CUDA device(s): cuda:0..{count - 1}",
            )
    try:
        devices = get_backend(backend).capabilities.devices
    except RuntimeError as exc:
        _fail(command, f"argument --backend: {exc}" if device is None else f"argument --device: {device!r}: {exc}")
    if device is None:
        return "cpu" if "cpu" in devices else "cuda"
    if torch.device(device).type not in devices:
        _fail(command, f"argument --device: {device!r}, but backend {backend!r} runs on {', '.join(devices)} here")
    return device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check ``argv``; on a bad value print one line and exit with code 2.

    The returned namespace has ``device`` resolved (never ``None``) and, for ``bench``,
    ``strategies`` filled in.
    """
    args = build_parser().parse_args(argv)
    if args.backend is None:  # the device's backend (lazyattention.backends.default_backend), by name
        args.backend = DEFAULT_BACKENDS.get(torch.device(args.device or "cpu").type, REFERENCE)
    args.device = _resolve_device(args.command, args.backend, args.device)
    if args.command == "bench":
        if args.docs_per_request > args.documents:
            _fail(
                "bench",
                f"argument --docs-per-request: {args.docs_per_request} is more than --documents {args.documents}",
            )
        args.strategies = args.strategies or list(STRATEGIES)
        try:
            output_paths(args.out, args.name)
        except ValueError as exc:
            _fail("bench", f"argument --out: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lazyattention`` console script."""
    args = parse_args(argv)
    try:
        if args.command == "check":
            from lazyattention.testing.check import run_check

            return run_check(args.backend, args.profile, args.functions, args.device)
        if args.command == "demo":
            if interpreted(args.backend, args.device):
                print(INTERPRETED_DEMO, file=sys.stderr, flush=True)
            return run_demo(args.backend, args.device, args.seed)
        params = {k: v for k, v in vars(args).items() if k in BENCH_DEFAULTS}
        run_bench(**params, progress=not args.quiet)
        return 0
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"lazyattention {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lazyattention {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
