"""The one error type every bad data input raises: a single line naming the file and what to do."""

from __future__ import annotations


class DataError(ValueError):
    """A data file, folder or record that cannot be used.

    The message is one line naming the offending path (and line, for JSONL) and the fix, e.g.
    ``data file 'corpus.idx' is truncated (1200 bytes, expected 5042); re-run `expertrain data prepare` ...``.
    """
