"""``expertrain plan``: a job's per-rank memory by kind, from its model built on the meta device for ``N`` ranks.

- :mod:`framework.plan.build`: the job typed for a world size and built on meta (plugins applied, the real parallel
  code run as rank 0 of a fake process group) — local shard shapes without weights;
- :mod:`framework.plan.memory`: the estimate as data (:class:`~framework.plan.memory.MemoryPlan`, bytes per kind);
- :mod:`framework.plan.command`: the command line (table or ``--json``).

How each kind is counted and how accurate the estimate is: ``docs/scaling.md``.
"""
