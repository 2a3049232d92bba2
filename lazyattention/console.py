"""What the ``lazyattention`` commands share on the console: printing and progress bars.

Tables and results go to stdout (:func:`say`); progress goes to stderr (:func:`note`,
:func:`ticking`, :class:`SweepProgress`), so ``lazyattention bench > table.txt`` keeps
only the tables.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm import tqdm

__all__ = ["SweepProgress", "cpu_threads_for", "note", "say", "ticking"]


def say(text: str = "") -> None:
    """Print a line to stdout at once (a long run's lines appear as they happen)."""
    print(text, flush=True)


def cpu_threads_for(model_name: str, device: str) -> None:
    """The tiny model's matmuls are far too small for intra-op threads: on a CPU they
    only add hand-off cost (about 100x on a loaded 2-core machine), so use one. Other
    models keep torch's count; ``lazyattention bench`` prints the count it runs with."""
    if device == "cpu" and model_name == "tiny":
        torch.set_num_threads(1)


def note(text: str, enabled: bool = True) -> None:
    """A progress line on stderr (nothing when not ``enabled``)."""
    if enabled:
        print(text, file=sys.stderr, flush=True)


@contextmanager
def ticking(what: str, enabled: bool = True) -> Iterator[None]:
    """A line on stderr that counts the seconds while the block runs: progress for work
    with no steps to count (building a large model)."""
    line = tqdm(desc=what, bar_format="{desc} {elapsed}", disable=not enabled, dynamic_ncols=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            line.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        line.close()


class SweepProgress:
    """Two progress bars for :func:`~lazyattention.serving.sweep.run_sweep`.

    The outer bar counts the sweep's runs (warm-ups included) and gives the ETA of the
    whole sweep; the inner bar, one per run, counts the requests served and shows the
    run's label. Pass the object as ``run_sweep(..., progress=bar)``; it is called as
    ``bar(label, done, total)`` after every engine step.

    Args:
        runs: how many runs (labels) the sweep will report.
        enabled: ``False`` draws nothing (``--quiet``).
    """

    def __init__(self, runs: int, enabled: bool = True):
        self.enabled = enabled
        self._runs = tqdm(total=runs, desc="sweep", unit="run", disable=not enabled, dynamic_ncols=True)
        self._run: tqdm | None = None
        self._label: str | None = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self._label:
            self._close_run()
            self._label = label
            self._run = tqdm(
                total=total, desc=f"  {label}", unit="req", leave=False, disable=not self.enabled, dynamic_ncols=True
            )
        self._run.update(done - self._run.n)  # also redraws the elapsed time while no request finishes
        if done == total:
            self._close_run()
            self._runs.update(1)

    def close(self) -> None:
        self._close_run()
        self._runs.close()

    def _close_run(self) -> None:
        if self._run is not None:
            self._run.close()
        self._run, self._label = None, None

    def __enter__(self) -> SweepProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
