"""Start ``N`` ranks of a module on this machine without torchrun's agent: ``python ranks.py N -m module args…``.

The ranks get the environment torchrun gives its workers (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, …,
``MASTER_ADDR``/``MASTER_PORT``, rank 0 hosting the store) and meet through ``env://``. What the tests save is the
agent: it imports torch (about 3 s of a CPU the ranks need while they start) and its rendezvous adds more; most
integration tests launch jobs to test the trainer, not torchrun, so they start ranks this way. Tests of torchrun
itself (launchers, restarts, errors under torchrun) still use it.

Like torchrun: the exit status is the first failed rank's (0 when all succeed); when a rank fails, the others get
a grace period to stop on their own (our ranks agree on errors and exit together), then SIGTERM, then SIGKILL. This
file imports nothing heavy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

GRACE_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(procs: list[subprocess.Popen]) -> None:
    for sig_send, wait_s in ((subprocess.Popen.terminate, 5.0), (subprocess.Popen.kill, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            sig_send(p)
        deadline = time.monotonic() + wait_s
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.02)


def main(argv: list[str]) -> int:
    nproc, command = int(argv[0]), argv[1:]
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "GROUP_RANK": "0",
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(subprocess.Popen([sys.executable, "-u", *command], env=env))
    failed_at: float | None = None
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            codes = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if codes and failed_at is None:
                failed_at, status = time.monotonic(), codes[0]
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                _stop(procs)
                break
            time.sleep(0.02)
    finally:
        _stop(procs)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return 1 if status < 0 else status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
