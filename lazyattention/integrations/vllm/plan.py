"""Where a request's documents sit in vLLM's token sequence, and at which logical positions.

vLLM pages a request's tokens into blocks of ``S`` in one sequence. The plugin lays a
request out as ``[document_0 | pad] … [document_{n-1} | pad] [prompt and output]``:

* every document starts on a block boundary and is padded to whole blocks, so its
  blocks are its own and can be shared by any request (the pad tokens are written but
  never attended: the last block's valid length is the document's, DESIGN §2);
* vLLM's order of the documents is free (cached ones first, so vLLM's prefix walk
  finds them all); their *logical* starts come from the request, and each block's
  shift ``δ = logical − stored`` carries them (eq. 6);
* a document is stored at its local positions ``0..L-1``: prefilled alone from 0. A
  document named twice is laid out once and placed twice.

The request's own tokens are stored where vLLM's model rotated them (their index in
the sequence); their logical positions start at ``own_start``, so their shift is
``own_start − own_vllm_start`` and attention among them is unchanged.

:meth:`RequestPlan.step_layouts` turns a plan plus the request's block table into the
:class:`~lazyattention.reference.RequestLayout`\\ s of one forward step. The plan is
plain data (:meth:`to_dict`): the scheduler writes it, the workers read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lazyattention.reference import Placement, RequestLayout

__all__ = ["LaidDocument", "Segment", "RequestPlan", "StepPiece", "plain_layout"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaidDocument:
    """One document in vLLM's sequence: ``length`` tokens from ``vllm_start`` (a block
    boundary), padded to ``ceil(length / S)`` blocks."""

    key: str
    length: int
    vllm_start: int


@dataclass(frozen=True)
class Segment:
    """One placement of a laid-out document: document ``doc`` at logical ``start``."""

    doc: int
    start: int


@dataclass(frozen=True)
class StepPiece:
    """A run of one step's query tokens that attends as one :class:`RequestLayout`.

    ``key_rotation`` is added to the rotation of the keys these tokens write: vLLM's
    model rotated them at their sequence index, a document stores them at its local
    positions (``-vllm_start``); own tokens are stored as rotated (0).
    """

    layout: RequestLayout
    first_position: int  # sequence index (vLLM's position) of the first query token
    key_rotation: int


@dataclass(frozen=True)
class RequestPlan:
    documents: tuple[LaidDocument, ...]
    segments: tuple[Segment, ...]
    own_vllm_start: int
    own_start: int
    block_size: int

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {
            "documents": [[d.key, d.length, d.vllm_start] for d in self.documents],
            "segments": [[s.doc, s.start] for s in self.segments],
            "own_vllm_start": self.own_vllm_start,
            "own_start": self.own_start,
            "block_size": self.block_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RequestPlan:
        return cls(
            documents=tuple(LaidDocument(k, n, a) for k, n, a in d["documents"]),
            segments=tuple(Segment(i, s) for i, s in d["segments"]),
            own_vllm_start=d["own_vllm_start"],
            own_start=d["own_start"],
            block_size=d["block_size"],
        )

    # ------------------------------------------------------------------ derived

    def document_blocks(self, d: int) -> range:
        """Indices, in the request's block table, of document ``d``'s blocks."""
        doc = self.documents[d]
        first = doc.vllm_start // self.block_size
        return range(first, first + _cdiv(doc.length, self.block_size))

    def logical_end(self, num_tokens: int) -> int:
        """One past the largest logical position once the sequence has ``num_tokens``."""
        ends = [s.start + self.documents[s.doc].length for s in self.segments]
        return max([*ends, self.own_start + num_tokens - self.own_vllm_start])

    # ------------------------------------------------------------------ one step

    def step_layouts(self, num_computed: int, num_scheduled: int, block_row) -> list[StepPiece]:
        """The layouts of query tokens ``[num_computed, num_computed + num_scheduled)``.

        A document's tokens in the step are prefilled alone, from position 0 (they see
        their own document causally, pads included: pads come last, so no document
        token sees one). Own tokens see every segment at its shift and themselves
        causally (eq. 7).

        Args:
            num_computed: tokens of the request already in the cache.
            num_scheduled: tokens computed in this step.
            block_row: the request's physical block ids, in sequence order (a list, or
                anything indexable by slices that gives ints).
        """
        S = self.block_size
        end = num_computed + num_scheduled
        pieces = []
        for doc in self.documents:
            padded = _cdiv(doc.length, S) * S
            lo, hi = max(num_computed, doc.vllm_start), min(end, doc.vllm_start + padded)
            if lo >= hi:
                continue
            first = doc.vllm_start // S
            blocks = tuple(int(b) for b in block_row[first : first + _cdiv(hi - doc.vllm_start, S)])
            own = Placement(blocks=blocks, length=hi - doc.vllm_start, start=0, stored_start=0)
            pieces.append(StepPiece(RequestLayout((), own, hi - lo), lo, -doc.vllm_start))
        lo = max(num_computed, self.own_vllm_start)
        if lo < end:
            segments = []
            for s in self.segments:
                doc_blocks = self.document_blocks(s.doc)
                blocks = tuple(int(b) for b in block_row[doc_blocks.start : doc_blocks.stop])
                segments.append(Placement(blocks=blocks, length=self.documents[s.doc].length, start=s.start))
            first = self.own_vllm_start // S
            length = end - self.own_vllm_start
            blocks = tuple(int(b) for b in block_row[first : first + _cdiv(length, S)])
            own = Placement(blocks=blocks, length=length, start=self.own_start, stored_start=self.own_vllm_start)
            pieces.append(StepPiece(RequestLayout(tuple(segments), own, end - lo), lo, 0))
        return pieces


def plain_layout(num_computed: int, num_scheduled: int, block_row, block_size: int) -> StepPiece:
    """A request without documents: ordinary causal attention over its own tokens."""
    end = num_computed + num_scheduled
    blocks = tuple(int(b) for b in block_row[: _cdiv(end, block_size)])
    own = Placement(blocks=blocks, length=end, start=0, stored_start=0)
    return StepPiece(RequestLayout((), own, num_scheduled), num_computed, 0)
