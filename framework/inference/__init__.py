"""Inference for quick checks of trained models: KV-cached generation (``generate``), exact-match evaluation and
the ``expertrain generate`` command (``cli``)."""
