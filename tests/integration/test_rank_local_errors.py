"""An error on one rank only still reaches the user as one clean line per rank: the failing rank names its error,
the other names the rank it lost, and no two ranks' lines run together (each is one ``write`` of a whole line).
A real plugin (installed through an entry point) raises in a hook on rank 1 only; two gloo ranks."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from tests.integration.launch import run_training
from tests.integration.plugin_site import install_plugin

RANK1_ONLY = textwrap.dedent(
    """
    import os
    from framework.hooks import hookimpl

    @hookimpl
    def expertrain_step_begin(step):
        if step == 2 and os.environ.get("RANK") == "1":
            raise ValueError("rank-local failure on rank 1 at step 2")
    """
)

ERROR = re.compile(r"\[rank (\d+)\] expertrain: error: ")


def test_an_error_on_one_rank_gives_one_clean_line_on_each_rank(tmp_path: Path) -> None:
    site = install_plugin(tmp_path / "site", "rank1_boom", RANK1_ONLY)
    proc = run_training(
        tmp_path / "run",
        ["plugins=[rank1_boom]", "train.steps=4", "parallel.timeout_s=60"],
        nproc=2,
        extra_path=[site],
        timeout=240,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    stderr_lines = proc.stderr.splitlines()
    lines = [line for line in stderr_lines if ERROR.search(line)]
    # One line per rank, each starting a line of its own: no other text before it, no second error inside it.
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all(ERROR.match(line) and len(ERROR.findall(line)) == 1 for line in lines), lines
    by_rank = {ERROR.match(line).group(1): line for line in lines}  # type: ignore[union-attr]
    assert set(by_rank) == {"0", "1"}
    assert "plugin 'rank1_boom'" in by_rank["1"] and "rank-local failure on rank 1 at step 2" in by_rank["1"]
    # Rank 0 did not fail itself: it names the rank it lost and the step, and points to that rank's own line.
    assert "at step 2: rank 1 did not respond" in by_rank["0"], by_rank["0"]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
