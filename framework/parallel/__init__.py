"""Process groups, device meshes and data-parallel wrapping (DDP / FSDP2); the collectives wrapper is framework.comm."""
