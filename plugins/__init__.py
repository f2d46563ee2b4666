"""Built-in expertrain plugins (PEFT methods under ``plugins/peft``, MoE variants under ``plugins/moe``).

Each registers through the ``expertrain.plugins`` entry-point group, exactly as a third-party package would; the core
never imports this package.
"""
