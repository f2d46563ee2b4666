"""megatron-core's dataset modules load without the package ``__init__`` (tensor parallelism, optimizers, Transformer
Engine probes), and code that imports the whole package afterwards still gets all of it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

SCRIPT = textwrap.dedent(
    """
    import sys
    from framework.data._megatron import megatron_datasets
    m = megatron_datasets()
    assert m.GPTDataset.__module__ == "megatron.core.datasets.gpt_dataset"
    assert "megatron.core.tensor_parallel" not in sys.modules, "the package __init__ ran"
    assert "megatron.core.optimizer" not in sys.modules
    import megatron.core
    from megatron.core import DistributedDataParallel, tensor_parallel
    assert megatron.core.__version__ and "megatron.core.tensor_parallel" in sys.modules
    assert megatron.core.parallel_state is sys.modules["megatron.core.parallel_state"]
    print("ok")
    """
)


def test_dataset_modules_skip_the_package_init_until_it_is_needed() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
