"""A request and its state: what it asked for, what it produced, what it holds.

A request is ``[document_0] … [document_{n-1}] [query]`` followed by generated tokens
(DESIGN §2). Its *own tokens* are the ones it computes itself, in one causal run:
``own_prefix + query + output`` (``own_prefix`` is empty, except under ``recompute``,
where it is the documents). While it runs it holds cache entries (its documents'
segments), the blocks of its own tokens and, under ``block_attention``, copies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from lazyattention.reference.cache import Segment
from lazyattention.reference.layout import Placement, ceil_div

__all__ = ["RequestStatus", "Request"]


class RequestStatus(enum.Enum):
    """``WAITING`` (holds nothing) → ``RUNNING`` (holds blocks; back to ``WAITING`` when
    preempted) → ``FINISHED``; ``ABORTED`` from ``WAITING`` or ``RUNNING``."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(eq=False)
class Request:
    """One request and everything the engine records about it.

    ``query`` and each document are lists of token ids; ``output`` fills with the
    generated ids. Times are ``time.perf_counter()`` seconds (device synchronised).
    """

    id: int
    query: list[int]
    documents: list[list[int]]
    max_new_tokens: int
    arrival: float
    output: list[int] = field(default_factory=list)
    pending: int = 0  # tokens sampled on the device, not yet in output
    status: RequestStatus = RequestStatus.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    hits: int = 0  # documents whose K/V was found cached (counted at its first admission)
    lookups: int = 0  # non-empty documents looked up
    preemptions: int = 0
    first_logits: torch.Tensor | None = None  # [V] float32, when the engine keeps them
    segment_keys: list[str] | None = None  # its documents' cache keys (the strategy's; set when queued)
    # what it holds while running (set at admission, cleared when it gives them back)
    own_prefix: list[int] = field(default_factory=list)  # own tokens before the query
    own_start: int = 0  # logical position of the first own token
    entries: list[Segment] = field(default_factory=list)  # cache entries it holds
    sources: list[Placement] = field(default_factory=list)  # its documents as cached
    placements: list[Placement] = field(default_factory=list)  # what its queries read besides own tokens
    own_blocks: list[int] = field(default_factory=list)
    copy_blocks: list[int] = field(default_factory=list)

    @property
    def document_tokens(self) -> int:
        return sum(len(d) for d in self.documents)

    @property
    def own_tokens(self) -> list[int]:
        """The tokens it computes itself: ``own_prefix + query + output``.

        Raises:
            RuntimeError: a token is still pending (its value is on the device).
        """
        if self.pending:
            raise RuntimeError(f"request {self.id}: {self.pending} sampled token(s) have not reached the host yet")
        return self.own_prefix + self.query + self.output

    @property
    def num_own(self) -> int:
        return len(self.own_prefix) + len(self.query) + len(self.output) + self.pending

    @property
    def done(self) -> bool:
        """All ``max_new_tokens`` tokens are sampled (some may still be pending)."""
        return len(self.output) + self.pending >= self.max_new_tokens

    def own_placement(self, block_size: int, length: int | None = None) -> Placement:
        """Its own tokens ``0..length-1`` (all of them by default), stored where they
        sit (shift 0)."""
        length = self.num_own if length is None else length
        k = ceil_div(length, block_size)
        return Placement(tuple(self.own_blocks[:k]), length, start=self.own_start, stored_start=self.own_start)
