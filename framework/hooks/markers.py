"""The pluggy markers of the ``expertrain`` project. Plugins decorate their hooks with :data:`hookimpl`."""

import pluggy

PROJECT = "expertrain"
ENTRY_POINT_GROUP = "expertrain.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)
