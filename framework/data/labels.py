"""The label value that takes no loss: the data pipeline writes it, the trainer's loss skips it."""

from __future__ import annotations

IGNORE_INDEX = -100
"""A label that takes no loss (prompt tokens of SFT samples, padding). ``-100`` is also the default
``ignore_index`` of ``torch.nn.functional.cross_entropy`` and of Hugging Face models."""
