"""The one error type every bad config raises: a single line naming the key, the value and what is accepted."""

from __future__ import annotations


class ConfigError(ValueError):
    """A job file, an override or a combination of values that cannot be used.

    The message is one line: ``config key 'train.steps': got -1; expected an integer >= 1``.
    """

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"config key '{key}': got {value!r}; {expected}")
