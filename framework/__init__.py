"""expertrain core: a distributed trainer for Mixture-of-Experts language models with pluggy extension points."""

__version__ = "0.1.0"
