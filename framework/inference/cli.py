"""``expertrain generate``: load a checkpoint (ours or a Hugging Face folder) and continue a prompt."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder, run folder (its latest checkpoint), or hf:<folder> (a Hugging Face model folder)",
    )
    p.add_argument("--prompt", required=True, help="text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")


def _load(checkpoint: str) -> tuple[object, Path]:
    """``(model, tokenizer folder)``."""
    from framework.interop.hf.job import hf_folder

    folder = hf_folder(checkpoint)
    if folder is None and (Path(checkpoint) / "config.json").is_file():
        folder = Path(checkpoint)
    if folder is not None:
        from framework.interop.hf import from_pretrained

        return from_pretrained(folder), folder
    from framework.checkpoint.export import load_model

    model, _, _, path = load_model(checkpoint)
    return model, path.parent.parent / "tokenizer"


def run_generate(args: argparse.Namespace) -> int:
    from framework.data.errors import DataError
    from framework.data.sft import ChatTokenizer
    from framework.inference.generate import generate

    model, tokenizer_dir = _load(args.checkpoint)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise DataError(
            f"no tokenizer.json in {tokenizer_dir}: generate needs the model's tokenizer beside it"
        )
    chat = ChatTokenizer.from_dir(tokenizer_dir)
    text = (
        chat.render([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        if args.chat
        else args.prompt
    )
    prompt_ids = chat.encode(text)
    start = time.perf_counter()
    new = generate(
        model,  # type: ignore[arg-type]
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=chat.stop_ids(),
        seed=args.seed,
        use_cache=not args.no_cache,
    )
    seconds = time.perf_counter() - start
    print(chat.decode(new))
    print(
        f"{len(new)} tokens in {seconds:.2f} s ({len(new) / max(seconds, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0
