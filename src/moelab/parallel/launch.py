"""``moelab run ... --nproc N``: the same command re-launched under torchrun with N local processes.

Equivalent to ``torchrun --standalone --nproc-per-node N -m moelab run ...`` (without ``--nproc``):
torch's elastic agent starts the workers (RANK/WORLD_SIZE/MASTER_ADDR... in their env, a free
rendezvous port on this host), watches them every ``--monitor-interval`` seconds and, when one
exits with an error, terminates the others and exits non-zero with a summary naming the rank.
No restarts (``--max-restarts 0``): a failure is reported, not retried.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from moelab.errors import MoelabError

#: seconds between the elastic agent's checks of its workers (the time a failure takes to stop the rest)
MONITOR_INTERVAL_S = 0.5


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def device_arg(argv: Sequence[str]) -> str:
    """The ``--device`` value in ``argv`` (``--device X`` or ``--device=X``; the last one wins), else "auto"."""
    spec = "auto"
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif a.startswith("--device="):
            spec = a.split("=", 1)[1]
    return spec


def check_gpus(nproc: int, device: str) -> None:
    """Refuse, before anything starts, an ``nproc``-process job that would put two ranks on one GPU (NCCL
    refuses that: "Duplicate GPU detected"): more processes than the GPUs torch sees, or one ``cuda:N``
    named for all of them. A CPU job (``--device cpu``, or ``auto`` without CUDA) is left alone."""
    import torch

    name = device.strip().lower()
    if name == "cpu" or nproc <= 1 or (name == "auto" and not torch.cuda.is_available()):
        return
    if not (name in ("auto", "cuda") or name.startswith("cuda:")):
        return  # not a device name: the workers' own --device check names the choices
    if not torch.cuda.is_available():
        return  # --device cuda without a GPU: refused by the workers with the reason
    count = torch.cuda.device_count()
    if name.startswith("cuda:"):
        raise MoelabError(f"--nproc {nproc} with --device {device}: every process would use that one GPU; use "
                          f"--device cuda (one GPU per process, {count} here) or --device cpu.")
    if nproc > count:
        raise MoelabError(f"--nproc {nproc}: {nproc} processes need one GPU each, but torch sees {count} GPU(s); "
                          f"use --nproc {count} or fewer, or --device cpu to run {nproc} processes on the CPU.")


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The torchrun command line that runs ``moelab <argv>`` on ``nproc`` local processes."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "--max-restarts", "0", "--monitor-interval", str(MONITOR_INTERVAL_S),
        "-m", "moelab", *strip_nproc(argv),
    ]


def launch_local(nproc: int, argv: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Run ``moelab <argv>`` (``--nproc`` removed) data-parallel on ``nproc`` local processes.

    A job that would put two ranks on one GPU is refused first (:func:`check_gpus`).
    Returns the exit status (0 when every rank succeeded). Each worker gets
    ``OMP_NUM_THREADS = cpus // nproc`` unless set. Workers' output goes to this process's
    stdout/stderr; a failing rank's error appears there, followed by torchrun's summary."""
    if nproc < 1:
        raise MoelabError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MoelabError("--nproc given inside a torchrun job: use either torchrun or --nproc, not both.")
    check_gpus(nproc, device_arg(argv))
    env = {**os.environ, **(env or {})}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # torchrun got the SIGINT too and stops its workers
        proc.wait(timeout=60)
        raise
    if rc != 0:
        print(f"moelab: error: the {nproc}-process run failed (torchrun exit status {rc}); the failing rank's "
              f"error is shown above, the other ranks were stopped.", file=sys.stderr)
    return rc


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(fn, nproc: int, args: tuple = (), *, backend: str | None = None, timeout_s: float = 60.0,
          threads: int | None = 1) -> None:
    """Run ``fn(rank, *args)`` in ``nproc`` fresh local processes joined in a process group (gloo on
    CPU, nccl on GPU, one GPU per process; rendezvous on 127.0.0.1 and a free port; collectives time out
    after ``timeout_s``). ``fn`` must be importable (module level). If a process raises, the others are
    terminated and the error is re-raised here (``torch.multiprocessing.ProcessRaisedException``)."""
    import torch
    import torch.multiprocessing as mp

    if (backend or ("nccl" if torch.cuda.is_available() else "gloo")) == "nccl":
        check_gpus(nproc, "cuda")  # one GPU per process, refused here rather than in every child
    port = free_port()
    mp.spawn(_spawned, args=(fn, nproc, port, backend, timeout_s, threads, args), nprocs=nproc, join=True)


def _spawned(rank: int, fn, nproc: int, port: int, backend, timeout_s: float, threads, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    from moelab.parallel import ddp

    if threads:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    ddp.init(backend, timeout_s=timeout_s)
    try:
        fn(rank, *args)
        dist.barrier()  # every rank done with its collectives before any tears the group down
    finally:
        dist.destroy_process_group()
