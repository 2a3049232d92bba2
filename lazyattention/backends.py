"""The attention backends as objects, and the one place a backend is chosen.

A :class:`Backend` holds what a caller needs from one implementation of the
definition: its attention functions (the module exposing
:data:`~lazyattention.reference.ATTENTION_API`, so swapping the module still swaps the
backend), its shared-segment decode where it has one, and what it can do, as data
(:class:`Capabilities`). Code that serves requests asks the backend object
(``backend.capabilities.cuda_graphs``, ``backend.sharing``); it never compares a
backend's name, and never imports :mod:`lazyattention.fast` itself.

:func:`get_backend` turns a name into a backend through :data:`BACKENDS`, a table of
loaders: one entry per backend, so a new backend is one more entry. A loader imports
its module when it is chosen and not before (``"reference"`` never pulls in Triton),
and raises naming what is missing. There is no fallback.

Example:
    >>> backend = get_backend("reference")
    >>> backend.name, backend.capabilities.cuda_graphs, backend.sharing is None
    ('reference', False, True)
    >>> default_backend("cpu").name
    'sdpa'
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from lazyattention.reference import ATTENTION_API

if TYPE_CHECKING:  # the fast path is imported only when it is chosen (it needs Triton)
    from lazyattention.fast.shared import SharingPlan

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKENDS",
    "Backend",
    "Capabilities",
    "REFERENCE",
    "SharedDecode",
    "INTERPRETED_ON_CPU",
    "default_backend",
    "get_backend",
    "interpreted",
]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data.

    Args:
        devices: device types its kernels run on (``"cpu"``, ``"cuda"``).
        cuda_graphs: its decode can be captured in a CUDA graph: its kernels read the
            step's block metadata from device buffers, and every launch parameter is
            fixed by the shapes.
        raw_cache: it serves the unrotated raw cache (``raw_prefill``, ``raw_decode``).
        shared_decode: it reads a segment that many requests of a decode batch share
            once for all of them (:class:`SharedDecode`).
        dtypes: the query and cache dtypes it computes in.
    """

    devices: tuple[str, ...]
    cuda_graphs: bool
    raw_cache: bool
    shared_decode: bool
    dtypes: tuple[torch.dtype, ...]


@dataclass(frozen=True)
class SharedDecode:
    """A backend's shared-segment decode (:mod:`lazyattention.fast.shared`).

    Args:
        plan_sharing: ``(layout, min_requests) -> SharingPlan | None``, the plan of a
            decode layout's segments read by at least ``min_requests`` requests.
        shared_decode: the decode attention that follows a plan, with
            ``lazy_decode``'s arguments plus ``sharing=``.
        shared_tiles: ``(num_heads, num_kv_heads, head_dim, block_size, dtype,
            device)`` -> the tiles the plan's kernel metadata is built for.
    """

    plan_sharing: Callable[..., SharingPlan | None]
    shared_decode: Callable[..., torch.Tensor]
    shared_tiles: Callable


@dataclass(frozen=True)
class Backend:
    """One implementation of the attention API, with its capabilities.

    Args:
        name: the name it is chosen by (a key of :data:`BACKENDS`).
        ops: the module of its attention functions, one per name of
            :data:`~lazyattention.reference.ATTENTION_API`.
        capabilities: what it can do.
        sharing: its shared-segment decode; ``None`` when it has none.
        packages: the packages beyond torch its kernels need, whose versions a
            result records (:meth:`versions`).

    Raises:
        ValueError: ``capabilities.shared_decode`` disagrees with ``sharing``, or
            ``ops`` lacks a function of the attention API.
    """

    name: str
    ops: ModuleType
    capabilities: Capabilities
    sharing: SharedDecode | None = None
    packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.capabilities.shared_decode != (self.sharing is not None):
            raise ValueError(
                f"backend {self.name!r}: capabilities.shared_decode={self.capabilities.shared_decode} "
                f"but sharing is {'set' if self.sharing is not None else 'None'}"
            )
        missing = [f for f in ATTENTION_API if not hasattr(self.ops, f)]
        if missing:
            raise ValueError(f"backend {self.name!r}: {self.ops.__name__} does not provide {', '.join(missing)}")

    def captures_on(self, device: torch.device | str) -> bool:
        """Whether its decode steps on ``device`` can be captured in CUDA graphs."""
        return self.capabilities.cuda_graphs and torch.device(device).type == "cuda"

    def versions(self) -> dict[str, str]:
        """The version of each of its :attr:`packages`, by name."""
        return {package: importlib.import_module(package).__version__ for package in self.packages}

    def shared(self) -> SharedDecode:
        """Its shared-segment decode.

        Raises:
            ValueError: the backend has none.
        """
        if self.sharing is None:
            raise ValueError(f"shared-segment decode needs a backend that has it; backend {self.name!r} does not")
        return self.sharing


# --------------------------------------------------------------------------- loaders


def _load_reference() -> Backend:
    """The PyTorch definition: every device PyTorch runs on, float64 included."""
    return Backend(
        name=REFERENCE,
        ops=importlib.import_module("lazyattention.reference.attention"),
        capabilities=Capabilities(
            devices=("cpu", "cuda"),
            cuda_graphs=False,
            raw_cache=True,
            shared_decode=False,
            dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        ),
    )


def _load_sdpa() -> Backend:
    """The CPU-speed PyTorch backend (:mod:`lazyattention.sdpa`): block-wise decode,
    fused attention per part merged by log-sum-exp for long prefills."""
    return Backend(
        name="sdpa",
        ops=importlib.import_module("lazyattention.sdpa"),
        capabilities=Capabilities(
            devices=("cpu",),
            cuda_graphs=False,
            raw_cache=True,
            shared_decode=False,
            dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        ),
    )


def _load_fast() -> Backend:
    """The Triton kernels: CUDA, or the CPU under ``TRITON_INTERPRET=1``.

    Raises:
        RuntimeError: no CUDA device and no interpreter, or Triton is missing.
    """
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        raise RuntimeError(
            "'fast' needs a CUDA GPU and this machine has none; "
            "set TRITON_INTERPRET=1 and pass --device cpu to run its kernels on the CPU (slowly)"
        )
    try:
        ops = importlib.import_module("lazyattention.fast")
        shared = importlib.import_module("lazyattention.fast.shared")
    except ImportError as exc:
        raise RuntimeError(f"'fast' needs Triton: importing lazyattention.fast failed ({exc})") from exc
    return Backend(
        name="fast",
        ops=ops,
        capabilities=Capabilities(
            devices=("cuda", "cpu") if interpret else ("cuda",),
            cuda_graphs=True,
            raw_cache=True,
            shared_decode=True,
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
        ),
        sharing=SharedDecode(
            plan_sharing=shared.plan_sharing,
            shared_decode=shared.shared_decode,
            shared_tiles=shared.shared_tiles,
        ),
        packages=("triton",),
    )


#: The name of the backend that defines the semantics; every other is checked against it.
REFERENCE = "reference"

#: The backends by name, each a loader called when it is chosen. A new backend is
#: one more entry here.
BACKENDS: dict[str, Callable[[], Backend]] = {
    REFERENCE: _load_reference,
    "sdpa": _load_sdpa,
    "fast": _load_fast,
}


#: The backends whose kernels run on the CPU only under the Triton interpreter
#: (``TRITON_INTERPRET=1``, set before Triton is imported; one Python call per kernel
#: instance, so slowly). Known without loading them: loading one imports Triton.
INTERPRETED_ON_CPU = frozenset({"fast"})


def interpreted(backend: str, device: torch.device | str) -> bool:
    """Whether the backend named runs its kernels under the Triton interpreter on ``device``."""
    return backend in INTERPRETED_ON_CPU and torch.device(device).type == "cpu"


#: The backend each device type runs when none is named (:func:`default_backend`); any
#: other device type runs the reference.
DEFAULT_BACKENDS: dict[str, str] = {"cuda": "fast", "cpu": "sdpa"}


def get_backend(backend: str | Backend) -> Backend:
    """The backend of that name (a :class:`Backend` is returned as it is).

    Raises:
        ValueError: a name outside :data:`BACKENDS`.
        RuntimeError: the backend cannot run here; the message names what is missing
            (Triton, a CUDA device).
    """
    if isinstance(backend, Backend):
        return backend
    loader = BACKENDS.get(backend)
    if loader is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return loader()


def default_backend(device: torch.device | str) -> Backend:
    """The backend to run on ``device`` when none is named: the Triton kernels
    (``"fast"``) on CUDA, the vectorised PyTorch backend (``"sdpa"``) on the CPU, the
    definition itself (``"reference"``) elsewhere."""
    return get_backend(DEFAULT_BACKENDS.get(torch.device(device).type, REFERENCE))
