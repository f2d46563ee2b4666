"""Checkpoint interoperability with other libraries (``hf``: Hugging Face transformers)."""
