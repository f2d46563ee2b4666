""":class:`FSDPPolicy`: what each config key turns into for ``fully_shard`` (the numbers are checked on gloo ranks in
tests/distributed/test_mixed_precision.py), and the refusal where FSDP2 does not shard."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

from framework.config.sections import ParallelConfig
from framework.parallel.data_parallel import FSDPPolicy, wrap_data_parallel
from framework.parallel.mesh import ParallelLayout, build_meshes

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_config_keys_map_to_dtypes_and_offload() -> None:
    parallel = ParallelConfig(param_dtype="bf16", reduce_dtype="fp32", cpu_offload=True)
    assert FSDPPolicy.from_config(parallel) == FSDPPolicy(torch.bfloat16, torch.float32, True)
    assert FSDPPolicy.from_config(ParallelConfig()).is_default


def test_default_policy_passes_nothing_so_plain_fsdp_is_unchanged() -> None:
    assert FSDPPolicy().fully_shard_kwargs(CPU) == {}


def test_bf16_compute_keeps_an_explicit_fp32_reduction() -> None:
    kwargs = FSDPPolicy(param_dtype=torch.bfloat16).fully_shard_kwargs(CPU)
    assert kwargs["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    assert type(kwargs["offload_policy"]) is OffloadPolicy  # the base class: no offload


def test_fp32_compute_with_a_bf16_reduction_does_not_cast_module_inputs() -> None:
    # A param_dtype would make FSDP2 cast every wrapped module's inputs to it; fp32 is passed as None.
    kwargs = FSDPPolicy(reduce_dtype=torch.bfloat16).fully_shard_kwargs(CPU)
    assert kwargs["mp_policy"] == MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.bfloat16)


def test_offload_pins_host_memory_only_for_a_cuda_device() -> None:
    policy = FSDPPolicy(cpu_offload=True)
    assert policy.fully_shard_kwargs(CUDA)["offload_policy"] == CPUOffloadPolicy(pin_memory=True)
    assert policy.fully_shard_kwargs(CPU)["offload_policy"] == CPUOffloadPolicy(pin_memory=False)


def test_a_policy_where_fsdp_does_not_shard_is_refused() -> None:
    one_rank = build_meshes(ParallelLayout.from_config(ParallelConfig(), 1), CPU)
    model = torch.nn.Linear(2, 2)
    assert wrap_data_parallel(model, "fsdp", CPU, one_rank) is model
    for mode in ("fsdp", "ddp"):
        with pytest.raises(ValueError, match=r"need parallel.data=fsdp over 2 or more data-parallel ranks"):
            wrap_data_parallel(model, mode, CPU, one_rank, policy=FSDPPolicy(param_dtype=torch.bfloat16))
