"""Peak memory of expertrain's own processes, part by part (``--part``; all parts by default).

Each part measures the peak resident set size (``VmHWM`` of ``/proc/self/status``) of fresh child processes, next
to the *interpreter baseline*: the peak of a child that only imports the modules the measured one had loaded at its
end (torch, the framework, ...), so that "above baseline" is what the work itself cost. Parts:

- ``export``: ``expertrain export hf`` of a ~0.6B-parameter qwen3_moe checkpoint (dim 1024, 6 layers, 32 experts of
  hidden 896, vocab 32000, fp32; written once by ``CheckpointStore.save`` from the model built and initialised by
  our ``Transformer``, the job config taken from a transformers ``Qwen3MoeConfig`` as ``model.init_from: hf:`` does),
  with ``--max-shard-mb`` (500 MB: several shards). Side by side: the in-memory path the export used before
  streaming (``load_model`` rebuilds the model, the whole state dict is converted and each shard written with
  ``save_file``; ``tests/unit/checkpoint/export_reference.py``) and the streamed ``expertrain export hf`` (CLI, in
  the child). The two folders are checked byte-identical before any number is reported. Target: the streamed
  export's peak ≤ 1.5 × its largest output shard + the interpreter baseline.

- ``export_lora``: ``expertrain export peft`` and ``expertrain export hf --merge`` of a LoRA job's checkpoint on the
  same model (r=16 on every linear layer and the routed experts, adapters moved off their init): the whole-model
  path (``whole_model=True``: ``load_model`` rebuilds the model, plugins export / merge from it) against the
  streamed CLI (the model on meta with only the adapters loaded; the merge folds them into each base tensor as it
  is written). Folders checked byte-identical. Target: peak ≤ 1.5 × the largest output file + the baseline.

- ``lora``, ``full``: every rank's peak for one training step, 1 rank against 4 (LoRA on a Hugging Face folder) and
  1/2/4 ranks (full training): see ``benchmarks/memory_train.py``.

More parts add a function to :data:`PARTS`; every part's result is merged into
``benchmarks/results/memory.{json,md}`` next to the parts already there.

    .venv/bin/python benchmarks/memory.py --part export      # ~3 min on 2 CPU cores, ~5 GB RAM, ~5 GB scratch disk
    .venv/bin/python benchmarks/memory.py --part export_lora # ~7 min, ~3 GB RAM, ~3 GB scratch disk
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import memory_train  # noqa: E402  (beside this file)

RESULTS = REPO / "benchmarks" / "results"
MB = 1024**2

# A child: import what it is told (or run one export), then report its peak RSS, its time and its loaded modules.
_CHILD = r"""
import importlib, json, sys, time
job = json.loads(sys.argv[1])
sys.path.insert(0, job["repo"])
for name in job.get("imports", []):
    try:
        importlib.import_module(name)
    except Exception:
        pass
start = time.perf_counter()
if job["mode"] == "streamed":
    from framework.cli import main
    args = ["export", "hf", "--checkpoint", job["checkpoint"], "--output", job["output"]]
    assert main([*args, "--max-shard-bytes", str(job["max_shard_bytes"])]) == 0
elif job["mode"] == "in_memory":
    from pathlib import Path
    from framework.checkpoint.export import load_model
    from tests.unit.checkpoint.export_reference import reference_hf_folder
    reference_hf_folder(load_model(job["checkpoint"])[0], Path(job["output"]), job["max_shard_bytes"])
elif job["mode"] == "cli":
    from framework.cli import main
    assert main(job["args"]) == 0
elif job["mode"] in ("checkpoint", "code"):
    exec(job["code"])
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
peak = int(status["VmHWM"].split()[0]) * 1024
print("RESULT " + json.dumps({"peak_rss": peak, "seconds": seconds, "modules": sorted(sys.modules)}))
"""

_MAKE_CHECKPOINT = r"""
from pathlib import Path
import torch
from transformers import Qwen3MoeConfig
from framework.checkpoint.store import CheckpointStore
from framework.config import resolve
from framework.interop.hf.config_map import spec_from_hf_config
from framework.models import Transformer
hf = Qwen3MoeConfig(**job["hf_config"]).to_dict()
raw = spec_from_hf_config(hf).job_sections()
raw["data"] = {"seq_len": 128}
config = resolve(raw)
model = Transformer(config.model, config.moe)
model.init_weights(config.train.seed)
meta = {"config": config.to_dict(), "world_size": 1}
CheckpointStore(Path(job["root"])).save(1, {"model": model.state_dict()}, meta, {})
print("PARAMS", sum(p.numel() for p in model.parameters()))
"""


_MAKE_LORA_CHECKPOINT = r"""
from pathlib import Path
import torch
from transformers import Qwen3MoeConfig
from framework.checkpoint.store import CheckpointStore
from framework.config import resolve
from framework.hooks import PluginManager
from framework.interop.hf.config_map import spec_from_hf_config
from framework.models import default_registry
from framework.train.assembly import assemble_single_process
hf = Qwen3MoeConfig(**job["hf_config"]).to_dict()
raw = spec_from_hf_config(hf).job_sections()
raw["data"] = {"seq_len": 128}
raw["plugins"] = ["lora"]
raw["lora"] = {"targets": "all-linear", "target_experts": True, "r": 16, "alpha": 32}
pm = PluginManager(default_registry())
pm.load(["lora"])
config = resolve(raw, pm.config_sections)
pm.hook.expertrain_validate_config(config=config, world_size=1)
model = assemble_single_process(config, pm).raw
generator = torch.Generator().manual_seed(0)
with torch.no_grad():  # trained adapters: B moved off 0, so the merge changes every adapted weight
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.add_(0.01 * torch.randn(p.shape, generator=generator))
meta = {"config": config.to_dict(), "world_size": 1}
state = {"model": model.state_dict(), "plugins": pm.plugin_state_dicts(model, config)}
CheckpointStore(Path(job["root"])).save(1, state, meta, {})
print("PARAMS", sum(p.numel() for p in model.parameters()))
"""

_WHOLE_EXPORT = r"""
from framework.checkpoint.export import export_hf, export_plugin_format
if job["format"] == "peft":
    export_plugin_format(job["checkpoint"], job["output"], "peft", whole_model=True)
else:
    export_hf(job["checkpoint"], job["output"], merge=True, max_shard_bytes=job["max_shard_bytes"], whole_model=True)
"""


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Run one child process; its report (peak RSS in bytes, seconds, loaded modules) and stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps({"repo": str(REPO), **job})],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"child {job['mode']} failed:\n{proc.stderr[-4000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line.removeprefix("RESULT ")), "stdout": proc.stdout}


def _baseline(modules: list[str]) -> int:
    """Peak RSS of a child that only imports ``modules``."""
    return _child({"mode": "baseline", "imports": modules})["peak_rss"]


def _folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of an export except ``export.json`` (which names the checkpoint)."""
    digests = {}
    for file in sorted(folder.iterdir()):
        if file.name == "export.json":
            continue
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(64 * MB):
                h.update(chunk)
        digests[file.name] = h.hexdigest()
    return digests


# --------------------------------------------------------------------------------------------------- export


def export_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``expertrain export hf`` of a ~0.6B qwen3_moe checkpoint: in-memory path vs streamed (see the docstring)."""
    hf_config = _hf_config(args)
    root = work / "run" / "checkpoints"
    made = _child({"mode": "checkpoint", "code": _MAKE_CHECKPOINT, "hf_config": hf_config, "root": str(root)})
    params = int(next(x for x in made["stdout"].splitlines() if x.startswith("PARAMS")).split()[1])
    print(f"checkpoint: {params / 1e6:.0f}M parameters ({made['seconds']:.0f} s)", flush=True)
    max_shard = args.max_shard_mb * 10**6
    rows, digests = [], {}
    for mode, label in (("in_memory", "in-memory (before)"), ("streamed", "streamed (expertrain export hf)")):
        out = work / f"export_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        report = _child(
            {"mode": mode, "checkpoint": str(root), "output": str(out), "max_shard_bytes": max_shard}
        )
        baseline = _baseline(report["modules"])
        shards = sorted(out.glob("*.safetensors"))
        largest = max(f.stat().st_size for f in shards)
        digests[mode] = _folder_digest(out)
        above = report["peak_rss"] - baseline
        rows.append(
            {
                "path": label,
                "peak_rss_mb": round(report["peak_rss"] / MB),
                "baseline_mb": round(baseline / MB),
                "above_baseline_mb": round(above / MB),
                "largest_shard_mb": round(largest / MB),
                "shards": len(shards),
                "above_baseline_per_largest_shard": round(above / largest, 2),
                "seconds": round(report["seconds"], 1),
            }
        )
        print(rows[-1], flush=True)
        if mode == "in_memory":
            shutil.rmtree(out)  # disk: keep one export at a time besides the checkpoint
    if set(digests["in_memory"]) != set(digests["streamed"]):
        raise RuntimeError(
            f"the exports hold other files: {sorted(digests['in_memory'])}, {sorted(digests['streamed'])}"
        )
    different = [name for name, d in digests["in_memory"].items() if digests["streamed"].get(name) != d]
    if different:
        raise RuntimeError(f"the streamed export differs from the in-memory one: {different}")
    streamed = rows[-1]
    return {
        "title": "expertrain export hf: peak memory",
        "setup": {
            "model": f"qwen3_moe, {params / 1e6:.0f}M parameters, fp32 ({params * 4 / 1e9:.2f} GB)",
            "hf_config": hf_config,
            "max_shard_bytes": max_shard,
            "checkpoint": "CheckpointStore.save of the model (model tensors only, one rank)",
        },
        "byte_identical": True,
        "target": "streamed: peak <= 1.5 x largest shard + interpreter baseline",
        "target_met": streamed["above_baseline_per_largest_shard"] <= 1.5,
        "rows": rows,
    }


def _hf_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.dim,
        "intermediate_size": 4 * args.dim,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": args.dim // 16,
        "num_experts": args.experts,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": args.expert_hidden,
        "max_position_embeddings": 512,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
    }


def export_lora_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``expertrain export peft`` and ``expertrain export hf --merge`` of a LoRA job's checkpoint on the same
    qwen3_moe model (LoRA r=16 on every linear layer and on the routed experts): the whole-model path (the model
    rebuilt by ``load_model``, ``whole_model=True``) against the streamed CLI, outputs checked byte-identical."""
    hf_config = _hf_config(args)
    root = work / "run" / "checkpoints"
    made = _child(
        {"mode": "checkpoint", "code": _MAKE_LORA_CHECKPOINT, "hf_config": hf_config, "root": str(root)}
    )
    params = int(next(x for x in made["stdout"].splitlines() if x.startswith("PARAMS")).split()[1])
    print(f"LoRA checkpoint: {params / 1e6:.0f}M parameters ({made['seconds']:.0f} s)", flush=True)
    max_shard = args.max_shard_mb * 10**6
    rows = []
    for fmt, cli in (("peft", ["export", "peft"]), ("hf --merge", ["export", "hf", "--merge"])):
        digests = {}
        for mode in ("whole", "streamed"):
            out = work / f"export_{fmt.split()[0]}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            if mode == "whole":
                job = {"mode": "code", "code": _WHOLE_EXPORT, "format": fmt.split()[0]}
                job |= {"checkpoint": str(root), "output": str(out), "max_shard_bytes": max_shard}
            else:
                args_ = [*cli, "--checkpoint", str(root), "--output", str(out)]
                if fmt != "peft":
                    args_ += ["--max-shard-bytes", str(max_shard)]
                job = {"mode": "cli", "args": args_}
            report = _child(job)
            baseline = _baseline(report["modules"])
            largest = max(f.stat().st_size for f in out.glob("*.safetensors"))
            digests[mode] = _folder_digest(out)
            above = report["peak_rss"] - baseline
            rows.append(
                {
                    "export": fmt,
                    "path": "whole model (before)" if mode == "whole" else "streamed (CLI)",
                    "peak_rss_mb": round(report["peak_rss"] / MB),
                    "baseline_mb": round(baseline / MB),
                    "above_baseline_mb": round(above / MB),
                    "largest_output_file_mb": round(largest / MB, 1),
                    "above_baseline_per_largest_file": round(above / largest, 2),
                    "seconds": round(report["seconds"], 1),
                }
            )
            print(rows[-1], flush=True)
            shutil.rmtree(out)
        if digests["whole"] != digests["streamed"]:
            raise RuntimeError(f"export {fmt}: the streamed folder differs from the whole-model one")
    return {
        "title": "expertrain export peft / hf --merge of a LoRA job: peak memory",
        "setup": {
            "model": f"qwen3_moe, {params / 1e6:.0f}M parameters with adapters, fp32",
            "lora": "r=16, alpha=32, all-linear + routed experts",
            "max_shard_bytes": max_shard,
        },
        "byte_identical": True,
        "target": "streamed: peak <= 1.5 x largest output file + interpreter baseline (the hf shards; the peft "
        "file is the adapters themselves)",
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------- results

PARTS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "export": export_part,
    "export_lora": export_lora_part,
    "lora": memory_train.lora_part,
    "full": memory_train.full_part,
}
"""Part name -> function measuring it (returns ``title``, ``rows`` and whatever else describes it)."""


def write_results(new: dict[str, dict[str, Any]]) -> None:
    """Merge ``new`` parts into ``benchmarks/results/memory.json`` (parts measured earlier kept) and rewrite the
    markdown from all of them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "memory.json"
    results = json.loads(path.read_text()) if path.is_file() else {"parts": {}}
    results["parts"].update(new)
    results["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    path.write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "memory.md").write_text(_markdown(results))


def _markdown(results: dict[str, Any]) -> str:
    lines = ["# Peak memory (benchmarks/memory.py)", ""]
    for name, part in results["parts"].items():
        lines += [f"## {name}: {part['title']}", ""]
        for key, value in part.items():
            if key not in ("title", "rows"):
                lines.append(f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}")
        rows = part["rows"]
        columns = list(rows[0])
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="part to measure (repeatable)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (a temporary one by default)")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert-hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-mb", type=int, default=500, help="export: shard size in MB (10^6 bytes)")
    args = parser.parse_args()
    measured = {}
    for name in args.part or sorted(PARTS):
        with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
            start = time.perf_counter()
            measured[name] = PARTS[name](args, Path(scratch))
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    write_results(measured)
    print((RESULTS / "memory.md").read_text())


if __name__ == "__main__":
    main()
