"""A Hugging Face folder through the whole product: ``model.init_from: hf:<folder>`` in a job, training at ep=2 (and
a deepseek_v3 folder, mla attention, at tp=2), ``expertrain export hf`` back to a folder transformers loads, and a
LoRA fine-tune whose ``export peft`` adapter gives our logits in peft on the transformers model. (The qwen3_moe folder
at tp=2 and tp=2 x ep=2 is loaded bit for bit by tests/distributed/test_hf_sharded_load.py; a job from an HF folder
at tp=2 through the launcher is the deepseek_v3 test here.)

The folder is a tiny random qwen3_moe (q/k norms, 4 experts, norm_topk_prob) whose shape equals the ``TINY`` test
model, so the job's own model settings agree with it. Tolerances: weights bit-identical (lr = 0 leaves them as
loaded; the export is a rename, a reshape and a copy); step-1 losses of a parallel layout and of one rank within
1e-5 relative (same samples, other reduction order); logits in peft vs ours within 1e-5 absolute (fp32, other
summation order).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from framework.cli import main as cli_main  # noqa: E402
from tests.integration.launch import QUICKSTART, REPO, TINY, run_training  # noqa: E402
from tests.unit.checkpoint.test_export_streamed import assert_streamed_exports_match  # noqa: E402

SFT_LORA = REPO / "examples" / "configs" / "sft_lora.yaml"


def _hf_folder(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=8192,  # the embedded corpus tokenizer's
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_position_embeddings=32,
        norm_topk_prob=True,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    folder = root / "hf_base"
    model.save_pretrained(folder)
    return folder


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _step1_loss(run_dir: Path) -> float:
    import json

    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_hf_folder_trains_at_ep2_and_exports_bit_identical(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path)
    original = _tensors(folder)
    common = [f"model.init_from=hf:{folder}", "optim.lr=0", "train.steps=1", "parallel.data=fsdp"]
    run_dir = tmp_path / "ep2"
    proc = run_training(run_dir, [*common, "parallel.ep=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "export_ep2"
    assert cli_main(["export", "hf", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
    exported = _tensors(out)
    assert exported.keys() == original.keys()
    different = [k for k in original if not torch.equal(exported[k], original[k])]
    assert not different, f"changed on the way through ep2: {different[:5]}"
    assert (out / "tokenizer.json").is_file(), "the run's tokenizer travels with the export"
    # The streamed export of this parallel-layout checkpoint equals the in-memory export's bytes.
    assert_streamed_exports_match(run_dir, tmp_path / "streamed_ep2")
    # One rank in this process: the same step-1 loss as ep=2 (which placed every shard where it belongs).
    one = tmp_path / "one"
    _train_in_process(QUICKSTART, [*TINY, *common, f"run.dir={one}", "parallel.data=ddp"])
    assert _step1_loss(run_dir) == pytest.approx(_step1_loss(one), rel=1e-5)
    # The saved job names the model the checkpoint describes (taken from config.json, not the job's defaults).
    saved = (tmp_path / "ep2" / "config.yaml").read_text()
    assert "qk_norm: true" in saved and "num_experts: 4" in saved


def _deepseek_folder(root: Path) -> Path:
    """A tiny random deepseek_v3 (mla with a low-rank query, interleaved RoPE, sigmoid group-limited routing, a
    shared expert, a dense first layer) of the ``TINY`` shape, but one key/value head per query head (mla)."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(
        vocab_size=8192,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    folder = root / "hf_deepseek"
    model.save_pretrained(folder)
    return folder


def test_deepseek_v3_folder_trains_at_tp2_and_exports_bit_identical(tmp_path: Path) -> None:
    """mla under tensor parallelism from a checkpoint: the replicated latent projections, the head-sharded up
    projections and the row-parallel output each get their part (step-1 loss equal to one rank's), and the export
    gathers them back bit for bit (lr = 0; only the aux-free routing bias moves, by the same step as on one rank)."""
    folder = _deepseek_folder(tmp_path)
    original = _tensors(folder)
    common = [f"model.init_from=hf:{folder}", "model.n_kv_heads=4", "optim.lr=0", "train.steps=1"]
    tp2, one = tmp_path / "tp2", tmp_path / "one"
    proc = run_training(tp2, [*common, "parallel.data=fsdp", "parallel.tp=2"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _train_in_process(QUICKSTART, [*TINY, *common, f"run.dir={one}", "parallel.data=ddp"])
    assert _step1_loss(tp2) == pytest.approx(_step1_loss(one), rel=1e-5)
    exported = {}
    for name, run_dir in (("tp2", tp2), ("one", one)):
        out = tmp_path / f"export_{name}"
        assert cli_main(["export", "hf", "--checkpoint", str(run_dir), "--output", str(out)]) == 0
        exported[name] = _tensors(out)
        assert exported[name].keys() == original.keys()
        assert_streamed_exports_match(run_dir, tmp_path / f"streamed_{name}")
    moved = [k for k in original if not torch.equal(exported["tp2"][k], original[k])]
    assert moved == ["model.layers.1.mlp.gate.e_score_correction_bias"], moved
    different = [k for k in original if not torch.equal(exported["tp2"][k], exported["one"][k])]
    assert not different, f"tp2 and one rank differ: {different[:5]}"


def _train_in_process(config: Path, overrides: list[str]) -> None:
    from framework.parallel.setup import DistInfo
    from framework.train.launch import load_job
    from framework.train.trainer import Trainer

    job, pm = load_job(str(config), overrides)
    trainer = Trainer(job, pm, DistInfo(0, 1, 0, torch.device("cpu")))
    trainer.build()
    trainer.run()


def test_lora_on_an_hf_base_exports_an_adapter_peft_reproduces(tmp_path: Path) -> None:
    """With the head and final norm trained in full (lora.modules_to_save): peft loads them with the adapters, and
    the merged folder holds them as the model's own weights."""
    from transformers import AutoModelForCausalLM

    from framework.checkpoint.export import load_model

    folder = _hf_folder(tmp_path)
    run_dir = tmp_path / "lora"
    overrides = [
        *TINY,
        f"model.init_from=hf:{folder}",
        f"run.dir={run_dir}",
        "lora.modules_to_save=[lm_head, norm]",
        "train.steps=2",
        "optim.lr=1e-2",
        "data.val_fraction=0",
        "logging.plots=false",
        "train.sample_tokens=0",
    ]
    _train_in_process(SFT_LORA, overrides)

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert cli_main(["export", "peft", "--checkpoint", str(run_dir), "--output", str(adapter)]) == 0
    assert cli_main(["export", "hf", "--merge", "--checkpoint", str(run_dir), "--output", str(merged)]) == 0
    ours = load_model(run_dir)[0]
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        base = AutoModelForCausalLM.from_pretrained(folder).eval()
        before = base(ids).logits
        with_adapter = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        got = with_adapter(ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert (expected - before).abs().max() > 1e-3, (
        "the adapters must have moved the model for this to test them"
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits, expected, atol=1e-5, rtol=0)
    # The trained head and norm: in the adapter under peft's keys, and in the merged folder as the model's own.
    base_tensors, merged_tensors = _tensors(folder), _tensors(merged)
    adapter_tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for ours_name, hf_name in (("output.weight", "lm_head.weight"), ("norm.weight", "model.norm.weight")):
        trained = ours.state_dict()[ours_name]
        assert not torch.equal(trained, base_tensors[hf_name]), f"{ours_name} must have trained"
        assert torch.equal(merged_tensors[hf_name], trained)
        assert torch.equal(adapter_tensors[f"base_model.model.{hf_name}"], trained)


def test_export_hf_of_adapters_without_merge_names_the_way_out(tmp_path: Path) -> None:
    """Exporting an adapted model as a plain HF folder would drop the adapters: refused, naming --merge."""
    folder = _hf_folder(tmp_path)
    run_dir = tmp_path / "lora"
    proc = run_training(
        run_dir,
        [f"model.init_from=hf:{folder}", "train.steps=1", "data.val_fraction=0", "train.sample_tokens=0"],
        nproc=0,
        config=SFT_LORA,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert cli_main(["export", "hf", "--checkpoint", str(run_dir), "--output", str(out)]) == 1
    assert not out.exists(), "a failed export leaves nothing behind"


def test_hf_config_conflicting_with_the_job_is_one_clear_error(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path)
    proc = run_training(
        tmp_path / "run", [f"model.init_from=hf:{folder}", "model.n_layers=3"], nproc=0, config=QUICKSTART
    )
    assert proc.returncode == 1
    assert "model.n_layers" in proc.stderr and "has 2" in proc.stderr and "Traceback" not in proc.stderr
