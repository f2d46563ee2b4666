"""Split a nested state into tensors (for DCP) and plain values (for JSON), and merge them back."""

from __future__ import annotations

from typing import Any

import torch

_TUPLE = "__tuple__"


def split_tensors(tree: Any) -> tuple[Any, Any]:
    """Return (tensor_tree, plain_tree): the same nesting, tensors in one and JSON-able leaves in the other.

    Missing leaves are left out of each tree, so ``merge`` can overlay them.
    """
    if isinstance(tree, torch.Tensor):
        return tree, None
    if isinstance(tree, dict):
        tensors, plain = {}, {}
        for k, v in tree.items():
            t, p = split_tensors(v)
            if t is not None:
                tensors[str(k)] = t
            if p is not None:
                plain[str(k)] = p
        return (tensors or None), (plain or None)
    if isinstance(tree, (list, tuple)):
        if any(isinstance(v, (torch.Tensor, dict)) for v in tree):
            as_dict = {str(i): v for i, v in enumerate(tree)}
            t, p = split_tensors(as_dict)
            return t, {"__list__": len(tree), "items": p} if p else {"__list__": len(tree)}
        items = [_plain(v) for v in tree]
        return None, ({_TUPLE: items} if isinstance(tree, tuple) else items)
    return None, {"__none__": True} if tree is None else _plain(tree)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return {_TUPLE: [_plain(x) for x in v]}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint (only tensors and plain values)")


def restore_plain(p: Any) -> Any:
    if isinstance(p, dict):
        if _TUPLE in p:
            return tuple(restore_plain(x) for x in p[_TUPLE])
        if p.get("__none__"):
            return None
        return {k: restore_plain(v) for k, v in p.items()}
    if isinstance(p, list):
        return [restore_plain(x) for x in p]
    return p


def overlay_plain(target: Any, plain: Any) -> Any:
    """Write the plain leaves of ``plain`` into ``target`` (nested dicts/lists), returning the updated target."""
    if plain is None:
        return target
    if isinstance(plain, dict) and "__list__" in plain:
        items = plain.get("items") or {}
        for k, v in items.items():
            target[int(k)] = overlay_plain(target[int(k)], v)
        return target
    if isinstance(plain, dict) and _TUPLE not in plain and not plain.get("__none__"):
        if not isinstance(target, dict):
            target = {}
        for k, v in plain.items():
            key: Any = k
            if k not in target:
                # Optimizer states are keyed by int ids in torch's own format; keep that.
                key = int(k) if k.lstrip("-").isdigit() and any(isinstance(x, int) for x in target) else k
            target[key] = overlay_plain(target.get(key), v)
        return target
    return restore_plain(plain)
