"""``expertrain export`` of a checkpoint trained with tensor and expert parallelism on 4 ranks (the shared ``tp2-ep2``
layout of test_parallel_equivalence.py, which keeps its final checkpoint): ``native`` holds whole, unsharded weights
that rebuild the trained model exactly, and ``hf`` gives a folder transformers loads to the same logits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from framework.checkpoint.export import load_model
from framework.cli import main as cli_main
from framework.config import load_raw, resolve
from framework.models import Transformer
from tests.distributed import test_parallel_equivalence  # noqa: F401  (registers the shared tp2-ep2 layout)
from tests.distributed.layouts import STEPS

pytestmark = pytest.mark.timeout(900)  # may be the test that trains the shared world-4 layouts (layouts.py)

LAYOUT = "tp2-ep2"


def test_export_native_matches_the_checkpoint(
    trained_layouts: Callable[[int], tuple[dict[str, Any], Path]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    results, root = trained_layouts(4)
    assert isinstance(results[LAYOUT], dict), f"{LAYOUT} failed:\n{results[LAYOUT]}"
    run_dir = root / LAYOUT
    out = tmp_path / "export"
    # The command's entry point in this process (a fresh interpreter would add ~3 s of imports).
    assert cli_main(["export", "native", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    for name in ("model.safetensors", "config.yaml", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name

    reference, _, _, path = load_model(run_dir)
    assert path.name == f"step_{STEPS:08d}"
    config = resolve(load_raw(out / "config.yaml"))
    rebuilt = Transformer(config.model, config.moe)
    rebuilt.load_state_dict(load_file(out / "model.safetensors"))
    rebuilt.eval()
    ids = torch.randint(0, config.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), reference(ids))
    # The trained weights, not a fresh init: they differ from what init_weights gives for the same seed.
    fresh = Transformer(config.model, config.moe)
    fresh.init_weights(config.train.seed)
    assert not torch.equal(fresh.state_dict()["output.weight"], rebuilt.state_dict()["output.weight"])

    # The same tp2 x ep2 checkpoint as a Hugging Face folder (a plain MoE model is a mixtral): transformers gives
    # our logits (fp32, other summation order: 1e-5).
    from transformers import AutoModelForCausalLM

    hf_out = tmp_path / "hf"
    assert cli_main(["export", "hf", "--checkpoint", str(run_dir), "--output", str(hf_out)]) == 0
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(hf_out).eval()(ids).logits
    torch.testing.assert_close(theirs, reference(ids), atol=1e-5, rtol=0)
    # A format no plugin of the job provides: exit 2, naming it, and no output folder left behind.
    capsys.readouterr()
    assert (
        cli_main(["export", "sparse-mask", "--checkpoint", str(run_dir), "--output", str(tmp_path / "x")])
        == 2
    )
    assert "export format 'sparse-mask' is not available" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
