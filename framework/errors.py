"""Error types shared across layers, on the ground floor so a low package can raise what a higher one also raises.

Each is a ``ValueError`` whose message is one line naming the file and the fix; ``framework/train/launch.py`` prints
it once per rank and exits 1.
"""

from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint file that is not what expertrain writes (or a Hugging Face folder whose tensors do not fit)."""
