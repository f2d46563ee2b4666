"""Named components that config values select: MoE blocks, routers, attention variants, PEFT methods.

The core registers its built-ins under the owner ``"core"``; plugins register theirs from the
``expertrain_register_components`` hook. A name registered twice for the same kind is an error naming both owners.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COMPONENT_KINDS = ("attention", "moe_block", "router", "peft_method")


class ComponentError(ValueError):
    """A duplicate or unknown component name."""


@dataclass(frozen=True)
class Component:
    kind: str
    name: str
    factory: Callable[..., Any]
    owner: str


class ComponentRegistry:
    """Maps (kind, name) to a factory and the plugin that registered it."""

    def __init__(self) -> None:
        self._components: dict[tuple[str, str], Component] = {}
        self.current_owner = "core"

    def register(self, kind: str, name: str, factory: Callable[..., Any], owner: str | None = None) -> None:
        """Register ``factory`` as component ``name`` of ``kind``; the owner defaults to the plugin being set up."""
        if kind not in COMPONENT_KINDS:
            raise ComponentError(
                f"unknown component kind {kind!r}; expected one of {', '.join(COMPONENT_KINDS)}"
            )
        owner = owner or self.current_owner
        existing = self._components.get((kind, name))
        if existing is not None:
            raise ComponentError(
                f"{kind} component {name!r} is registered twice: by plugin '{existing.owner}' and by plugin '{owner}'; "
                "rename one of them or disable one plugin"
            )
        self._components[(kind, name)] = Component(kind, name, factory, owner)

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._components[(kind, name)]
        except KeyError:
            known = ", ".join(sorted(n for k, n in self._components if k == kind)) or "none"
            raise ComponentError(
                f"no {kind} component named {name!r}; registered: {known} (is the plugin that provides it listed in 'plugins'?)"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._components if k == kind)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._components
