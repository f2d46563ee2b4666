"""The ground floor: collectives over torch.distributed (``collectives.py``) that every other package may import.

It imports nothing of the project, so models, data, checkpoints and plugins can take part in collectives without
reaching up into ``framework/parallel`` (which builds meshes and wraps models, and imports the model code).
"""
