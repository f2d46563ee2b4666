"""The layout equivalence set over NCCL: one GPU against ep, tp, tp x ep, etp, FSDP and DeepSpeed ZeRO-2, each rank
on its own GPU (as many layouts as the visible GPUs allow; the others are skipped, never doubled up on a GPU).

The same job, initial weights and global batch as tests/distributed/test_parallel_equivalence.py (the real trainer
through tests/distributed/layouts.py), in fp32 on CUDA. Tolerances, wider than gloo's on CPU: cuBLAS chooses its
GEMM algorithm (split-K, tile order) by shape, so a matmul sharded over tp or a different count of expert rows sums
its products in another order, and NCCL's ring all-reduce adds ranks in another order than one GPU's accumulation;
each such sum is off by ~sqrt(K) fp32 ulps (~1e-6 relative for K ~ 256). Step-1 gradients: 1e-4 relative with a
1e-6 absolute floor for the near-zero entries (a few layers of such sums); losses over 3 steps: 1e-3 relative, as on
CPU (Adam divides by the square root of tiny second moments and amplifies round-off).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch

from framework.config.errors import ConfigError
from framework.parallel.setup import pick_device
from tests.distributed.layouts import train_layouts
from tests.distributed.spawn import run_ranks
from tests.gpu.devices import needs_gpus

pytestmark = pytest.mark.timeout(900)

FSDP = "parallel.data=fsdp"
ZERO2 = ("train.engine=deepspeed", "deepspeed.zero_stage=2")
ON_GPU = ("train.device=cuda",)
LAYOUTS: dict[int, dict[str, tuple[str, ...]]] = {
    1: {"single": ()},
    2: {
        "dp2-fsdp": (FSDP,),
        "dp2-ddp": ("parallel.data=ddp",),
        "ep2": (FSDP, "parallel.ep=2"),
        "tp2": (FSDP, "parallel.tp=2"),
        "tp2-etp1": (FSDP, "parallel.tp=2", "parallel.etp=1"),
        "zero2": ZERO2,
    },
    4: {
        "dp2-ep2": (FSDP, "parallel.ep=2"),
        "tp2-ep2": (FSDP, "parallel.tp=2", "parallel.ep=2"),
        "tp2-ep2-etp1": (FSDP, "parallel.tp=2", "parallel.ep=2", "parallel.etp=1"),
        "zero2-ep2": (*ZERO2, "parallel.ep=2"),
    },
}
GRADS_RTOL, GRADS_ATOL, LOSS_RTOL = 1e-4, 1e-6, 1e-3
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NO_DEEPSPEED = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed")


def _params(world: int) -> list[Any]:
    return [pytest.param(n, marks=NO_DEEPSPEED) if n.startswith("zero") else n for n in LAYOUTS[world]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``get(world)``: every layout of ``world`` trained in one NCCL spawn (rank r on cuda:r), the first time."""
    cache: dict[int, dict[str, Any]] = {}

    def get(world: int) -> dict[str, Any]:
        if world not in cache:
            root = tmp_path_factory.mktemp(f"nccl-world{world}")
            layouts = {
                name: (*ON_GPU, *o)
                for name, o in LAYOUTS[world].items()
                if HAS_DEEPSPEED or not name.startswith("zero")
            }
            cache[world] = run_ranks(
                train_layouts, world, str(root), layouts, "cuda", timeout=900, device="cuda"
            )[0]
        return cache[world]

    return get


def _reference(trained: Any) -> dict[str, Any]:
    ref = trained(1)["single"]
    assert isinstance(ref, dict), f"the one-GPU reference failed:\n{ref}"
    return ref


def _check(name: str, got: Any, ref: dict[str, Any]) -> None:
    assert isinstance(got, dict), f"{name} failed:\n{got}"
    torch.testing.assert_close(
        torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=LOSS_RTOL, atol=0
    )
    assert got["grad_norms"][0] == pytest.approx(ref["grad_norms"][0], rel=GRADS_RTOL)
    if name.startswith("zero"):
        return  # ZeRO-2 keeps gradients in its own partitioned buffers: the norm above covers them
    assert set(got["grads"]) == set(ref["grads"])
    for param, g in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][param],
            g,
            rtol=GRADS_RTOL,
            atol=GRADS_ATOL,
            msg=lambda m, p=param: f"{name} {p}: {m}",
        )


def test_one_gpu_reference_trains_on_cuda(trained: Any) -> None:
    ref = _reference(trained)
    assert len(ref["losses"]) == 3 and all(torch.isfinite(torch.tensor(ref["losses"])))
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())


@needs_gpus(2)
@pytest.mark.parametrize("layout", _params(2))
def test_two_gpu_layout_matches_one_gpu(layout: str, trained: Any) -> None:
    _check(layout, trained(2)[layout], _reference(trained))


@needs_gpus(4)
@pytest.mark.parametrize("layout", _params(4))
def test_four_gpu_layout_matches_one_gpu(layout: str, trained: Any) -> None:
    _check(layout, trained(4)[layout], _reference(trained))


def test_more_local_ranks_than_gpus_is_refused_with_the_real_count() -> None:
    """The start-up check of framework/parallel/setup.py with this machine's own device count."""
    gpus = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=f"{gpus + 1} ranks on this machine but {gpus} visible GPU"):
        pick_device("auto", 0, local_world_size=gpus + 1)
    assert pick_device("auto", gpus - 1, local_world_size=gpus) == torch.device("cuda", gpus - 1)
