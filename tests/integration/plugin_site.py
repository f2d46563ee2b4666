"""A one-file plugin installed for a test: an entry point in a folder the job gets on its PYTHONPATH."""

from __future__ import annotations

from pathlib import Path


def install_plugin(site: Path, name: str, source: str) -> Path:
    """Write module ``name`` with ``source`` and its ``expertrain.plugins`` entry point under ``site``; returns it."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[expertrain.plugins]\n{name} = {name}\n")
    return site
