"""Inference for quick checks of trained models: KV-cached generation and exact-match evaluation."""

from framework.inference.generate import exact_match_accuracy, generate

__all__ = ["exact_match_accuracy", "generate"]
