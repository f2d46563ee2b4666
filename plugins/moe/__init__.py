"""MoE variant plugins: DeepSeekMoE (``deepseek_moe``), Chain-of-Experts (``chain_of_experts``), MoLA (``mola``).

Each module is one plugin, registered under the entry-point group ``expertrain.plugins`` and enabled by naming it in
a job's ``plugins`` list; its options live in the job's top-level section of the same name.
"""
