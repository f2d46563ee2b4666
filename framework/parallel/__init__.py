"""Process groups, the collectives wrapper and data-parallel wrapping (DDP / FSDP2)."""
