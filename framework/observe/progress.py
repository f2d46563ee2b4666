"""The rank-0 progress bar: step, loss, tokens/s and ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm

from framework.comm import collectives as C


class ProgressBar:
    """A tqdm bar over optimizer steps on rank 0; silent elsewhere or when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train") -> None:
        self.bar = None
        if enabled and C.rank() == 0:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5,
                bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining} {postfix}",
            )

    def update(self, loss: float, tokens_per_s: float, extra: str = "") -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.3f} · {tokens_per_s:,.0f} tok/s{extra}", refresh=False)
            self.bar.update(1)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        elif C.rank() == 0:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
