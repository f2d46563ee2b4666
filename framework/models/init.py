"""Deterministic initialisation that does not depend on the device or the parallel layout.

A model is initialised with a :class:`KeyedInit`: every parameter's values are a function of the seed, the
parameter's name and the element's index only. The tensor is cut along its first dimension into blocks of about
``BLOCK_ELEMENTS`` elements, and each block is drawn on the CPU from its own ``torch.Generator`` seeded by
``(seed, name, block)``. A rank that holds a shard (tensor, expert or FSDP parallelism, any mix) draws only the
blocks its shard touches and keeps its box, so it writes exactly the values the whole tensor would have on one rank
without ever holding it. The cost of a shard cut on a later dimension (row-parallel weights, expert tensors that FSDP2
cuts on a hidden dimension) is drawing its full rows: for an expert tensor, one whole expert at a time.

The module-level :func:`normal_` / :func:`uniform_` take either a :class:`KeyedInit` (keyed by the tensor's name) or
a plain ``torch.Generator`` (values drawn in order from it, for whole tensors only: unit tests of single modules).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from framework.models.sharding import local_box, local_part

BLOCK_ELEMENTS = 1 << 20
"""Elements per independently seeded block (rounded to whole rows of the first dimension)."""

Draw = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Fills a fresh fp32 CPU tensor in place from a generator."""


class KeyedInit:
    """Initial values keyed by parameter name: the same on every layout. Build it on the model to initialise,
    after parallelisation and materialisation (names are looked up by tensor identity)."""

    def __init__(self, seed: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.seed = int(seed)
        self._names: dict[int, str] = {}
        for name, tensor in named_tensors:
            self._names.setdefault(id(tensor), name.replace("._orig_mod", ""))

    @classmethod
    def for_model(cls, seed: int, model: nn.Module) -> KeyedInit:
        """Keys for every parameter and buffer of ``model`` (names without ``torch.compile``'s ``_orig_mod``)."""
        return cls(seed, [*model.named_parameters(), *model.named_buffers()])

    def name_of(self, tensor: torch.Tensor) -> str:
        name = self._names.get(id(tensor))
        if name is None:
            raise KeyError(
                "this tensor is not a parameter or buffer of the model the initialiser was built on "
                f"(shape {tuple(tensor.shape)}); build KeyedInit.for_model after the model's last change"
            )
        return name

    @torch.no_grad()
    def fill_(self, tensor: torch.Tensor, draw: Draw, salt: str = "") -> torch.Tensor:
        """Fill this rank's part of ``tensor`` with the values ``draw`` gives the whole tensor, block by block."""
        key = f"{self.seed}:{self.name_of(tensor)}:{salt}"
        shape = tuple(tensor.shape)
        out = local_part(tensor)
        if len(shape) == 0:
            out.copy_(draw(torch.empty(()), _generator(key, 0)))
            return tensor
        box = local_box(tensor)
        row = _prod(shape[1:])
        rows_per_block = max(1, BLOCK_ELEMENTS // max(row, 1))
        first, last = box[0].start, box[0].stop
        for block in range(first // rows_per_block, -(-last // rows_per_block)):
            start = block * rows_per_block
            stop = min(start + rows_per_block, shape[0])
            values = draw(torch.empty((stop - start, *shape[1:])), _generator(key, block))
            lo, hi = max(first, start), min(last, stop)
            piece = values[(slice(lo - start, hi - start), *box[1:])]
            out[lo - first : hi - first].copy_(piece)
        return tensor

    def normal_(self, tensor: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return self.fill_(tensor, lambda t, g: t.normal_(mean, std, generator=g))

    def uniform_(self, tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return self.fill_(tensor, lambda t, g: t.uniform_(low, high, generator=g))


InitSource = KeyedInit | torch.Generator | None
"""Where initial values come from: keyed by name, or drawn in order from a generator (``None``: torch's default)."""


@torch.no_grad()
def normal_(tensor: torch.Tensor, std: float, generator: InitSource) -> torch.Tensor:
    """Fill ``tensor`` in place with ``N(0, std²)``: keyed values for a :class:`KeyedInit`, else drawn in fp32 on the
    CPU from ``generator`` in order."""
    if isinstance(generator, KeyedInit):
        return generator.normal_(tensor, std)
    values = torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
    return _copy_whole(tensor, values)


@torch.no_grad()
def uniform_(tensor: torch.Tensor, low: float, high: float, generator: InitSource) -> torch.Tensor:
    """Fill ``tensor`` in place with ``U(low, high)`` (see :func:`normal_` for ``generator``)."""
    if isinstance(generator, KeyedInit):
        return generator.uniform_(tensor, low, high)
    values = torch.empty(tensor.shape, dtype=torch.float32).uniform_(low, high, generator=generator)
    return _copy_whole(tensor, values)


def _copy_whole(tensor: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if tuple(local_part(tensor).shape) != tuple(tensor.shape):
        raise ValueError(
            "a sharded tensor needs a KeyedInit (values keyed by name), not a sequential generator"
        )
    local_part(tensor).copy_(values)
    return tensor


def _generator(key: str, block: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{key}:{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _prod(dims: Iterable[int]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out
