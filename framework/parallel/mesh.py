"""The parallel layout (``dp · tp · ep``), its start-up checks, and the device meshes built from it.

Ranks are laid out as ``world = dp_replicate × dp_shard × tp`` (tensor parallel innermost, so a tensor-parallel group
is a block of consecutive ranks, i.e. one node on GPU machines). Expert parallelism borrows its ranks from
``dp_shard`` (as torchtitan does) instead of adding a dimension: ``dp_shard = efsdp × ep``. Expert weights are sharded
over ``ep`` (whole experts), FSDP-sharded over ``efsdp`` (and replicated over ``dp_replicate``), and over ``tp``:

- ``etp == tp`` (the default): each expert's hidden dimension is split over the tensor-parallel ranks like the dense
  MLP; the MoE layer gathers its sequence-parallel tokens over ``tp`` after routing and reduce-scatters the output.
- ``etp == 1``: whole experts on every tensor-parallel rank; each rank computes its own sequence-parallel slice.

Tokens always enter the MoE layer split along the sequence over ``tp``, so no rank routes a token another routes.
The world mesh has four named dimensions ``(dp_replicate, efsdp, ep, tp)`` — any may have size 1 — and every other
mesh is a view of it (FSDP2 needs that to compose with DTensor placements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from framework.config import ConfigError
from framework.config.sections import ModelConfig, MoEConfig, ParallelConfig
from framework.parallel.tensor_parallel import check_tensor_parallel


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of every parallel dimension for one job. Build with :meth:`from_config` (which checks them)."""

    world: int
    tp: int
    ep: int
    etp: int
    dp_replicate: int
    dp_shard: int
    sequence_parallel: bool

    @property
    def dp(self) -> int:
        """Data-parallel ranks: how many different micro-batches are processed at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Ranks over which each expert's weights are FSDP-sharded."""
        return self.dp_shard // self.ep

    @property
    def is_parallel(self) -> bool:
        return self.world > 1

    def describe(self) -> str:
        parts = [f"dp={self.dp}"]
        if self.dp_replicate > 1:
            parts.append(f"(replicate {self.dp_replicate} × shard {self.dp_shard})")
        parts.append(f"tp={self.tp}")
        parts.append(f"ep={self.ep}")
        if self.tp > 1:
            parts.append(f"etp={self.etp}")
            parts.append("sequence-parallel" if self.sequence_parallel else "no sequence parallel")
        return " ".join(parts)

    @classmethod
    def from_config(
        cls,
        parallel: ParallelConfig,
        world: int,
        model: ModelConfig | None = None,
        moe: MoEConfig | None = None,
        seq_len: int | None = None,
    ) -> ParallelLayout:
        """Check ``parallel`` against the world size (and the model when given); one clear error per problem."""
        tp, ep, etp = parallel.tp, parallel.ep, parallel.resolved_etp
        launch_hint = "or launch with another --nproc_per_node"
        if world % tp:
            raise ConfigError(
                "parallel.tp",
                tp,
                f"expected a divisor of the world size {world}; change parallel.tp {launch_hint}",
            )
        dp = world // tp
        if dp % parallel.dp_replicate:
            raise ConfigError(
                "parallel.dp_replicate",
                parallel.dp_replicate,
                f"expected a divisor of the data-parallel size {dp} (world {world} / tp {tp})",
            )
        dp_shard = dp // parallel.dp_replicate
        if dp_shard % ep:
            raise ConfigError(
                "parallel.ep",
                ep,
                f"expected a divisor of the data-parallel shard size {dp_shard} (world {world} / tp {tp}"
                f" / dp_replicate {parallel.dp_replicate}): expert parallelism borrows data-parallel ranks",
            )
        layout = cls(
            world=world,
            tp=tp,
            ep=ep,
            etp=etp,
            dp_replicate=parallel.dp_replicate,
            dp_shard=dp_shard,
            sequence_parallel=parallel.sequence_parallel and tp > 1,
        )
        if model is not None and moe is not None:
            layout.check_model(model, moe, seq_len)
        return layout

    def check_model(self, model: ModelConfig, moe: MoEConfig, seq_len: int | None) -> None:
        """Shapes the layout must divide: experts by ep, expert hidden by etp, heads / vocabulary / MLP by tp."""
        if self.ep > 1:
            if moe.num_experts == 0:
                raise ConfigError("parallel.ep", self.ep, "expected 1 for a dense model (moe.num_experts=0)")
            if moe.num_experts % self.ep:
                raise ConfigError(
                    "parallel.ep", self.ep, f"expected a divisor of moe.num_experts={moe.num_experts}"
                )
        if moe.num_experts and moe.expert_hidden % self.etp:
            raise ConfigError(
                "moe.expert_hidden",
                moe.expert_hidden,
                f"expected a multiple of the expert tensor-parallel size {self.etp} (parallel.etp / tp)",
            )
        check_tensor_parallel(model, self.tp, seq_len or 0, self.sequence_parallel)


@dataclass
class ParallelMeshes:
    """The device meshes of one layout (``None`` where a dimension has size 1 and nothing needs it)."""

    layout: ParallelLayout
    world: DeviceMesh | None
    dp: DeviceMesh | None
    """Where dense weights are FSDP-sharded: all data-parallel ranks, 2-D ``(dp_replicate, dp_shard)`` with HSDP."""
    dp_flat: DeviceMesh | None
    """All data-parallel ranks as one dimension (the data loader's rank and size, loss-token counts)."""
    tp: DeviceMesh | None
    ep: DeviceMesh | None
    ep_tp: DeviceMesh | None
    """``(ep, tp)``: where expert weights live when both are used (their DTensor mesh)."""
    efsdp: DeviceMesh | None
    """Where expert weights are FSDP-sharded (``(dp_replicate, efsdp)`` with HSDP)."""

    def dp_rank_and_size(self) -> tuple[int, int]:
        """This rank's data-parallel index and the data-parallel size (ranks of a tp group share a micro-batch)."""
        if self.dp_flat is None:
            return 0, 1
        return self.dp_flat.get_local_rank(), self.dp_flat.size()


def build_meshes(layout: ParallelLayout, device: torch.device) -> ParallelMeshes:
    """Create the world mesh and its views. Call on every rank after the process group exists."""
    if not layout.is_parallel:
        return ParallelMeshes(layout, None, None, None, None, None, None, None)
    names = ("dp_replicate", "efsdp", "ep", "tp")
    world = init_device_mesh(
        device.type, (layout.dp_replicate, layout.efsdp, layout.ep, layout.tp), mesh_dim_names=names
    )
    dp_shard = world["efsdp", "ep"]._flatten("dp_shard")
    dp_flat = world["dp_replicate", "efsdp", "ep"]._flatten("dp")
    # Kept as returned: torch deprecates slicing a flattened dimension from the root mesh (HSDP still has to).
    dp = world["dp_replicate", "dp_shard"] if layout.dp_replicate > 1 else dp_shard
    tp = world["tp"] if layout.tp > 1 else None
    ep = efsdp = None
    if layout.ep > 1:
        ep = world["ep"]
        efsdp = world["dp_replicate", "efsdp"] if layout.dp_replicate > 1 else world["efsdp"]
    has_dp = layout.dp > 1
    ep_tp = world["ep", "tp"] if layout.ep > 1 and layout.tp > 1 else None
    return ParallelMeshes(
        layout, world, dp if has_dp else None, dp_flat if has_dp else None, tp, ep, ep_tp, efsdp
    )
