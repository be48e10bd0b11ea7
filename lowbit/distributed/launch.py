"""Start a function on several local processes joined in a gloo process group.

``torchrun`` is the way to run on several machines; :func:`run_local` is for one machine (the
CLI's ``--nproc``, tests, benchmarks): it spawns the ranks, gives them a process group on a free
localhost port, returns what each rank's function returned, and turns a rank that fails or dies
into an error naming it, stopping the others, within ``timeout_s``.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["RankFailedError", "free_port", "run_local"]


class RankFailedError(RuntimeError):
    """A rank of :func:`run_local` raised, died or ran past the timeout."""


def free_port() -> int:
    """A TCP port on localhost free at the time of the call.

    >>> 0 < free_port() < 65536
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _to_host(value: Any) -> Any:
    """Tensors become numpy arrays (sent by value, not as shared memory that dies with the
    rank's process)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value


def _from_host(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: _from_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_from_host(v) for v in value)
    return value


# what a rank's error says when it only lost a peer (the consequence, not the cause)
_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "timed out", "timeout")


def _worker(
    rank: int,
    fn: Callable[..., Any],
    nproc: int,
    port: int,
    timeout_s: float,
    threads: int,
    messages: Any,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
    )
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=nproc,
            timeout=datetime.timedelta(seconds=timeout_s or 1800.0),
        )
        try:
            messages.put(("ok", rank, _to_host(fn(rank, *args))))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - reported to the parent, then exit 1
        peer = any(word in str(err).lower() for word in _PEER_LOST)
        messages.put(("error", rank, traceback.format_exc(), peer))
        sys.exit(1)


class _Job:
    """The spawned ranks and what they reported."""

    def __init__(self, procs: list[Any], messages: Any) -> None:
        self.procs, self.messages = procs, messages
        self.results: dict[int, Any] = {}
        self.errors: dict[int, tuple[str, bool]] = {}

    def drain(self) -> None:
        while not self.messages.empty():
            kind, rank, *rest = self.messages.get()
            if kind == "ok":
                self.results[rank] = rest[0]
            else:
                self.errors[rank] = (rest[0], rest[1])

    def failed(self) -> dict[int, int]:
        return {r: p.exitcode for r, p in enumerate(self.procs) if p.exitcode not in (None, 0)}

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()

    def failure(self, nproc: int) -> RankFailedError:
        """The error naming the rank that caused the failure: one that raised an error of
        its own, else one that died without a word, else the first that lost a peer."""
        failed = self.failed()
        own = [r for r, (_, peer) in sorted(self.errors.items()) if not peer]
        silent = [r for r in sorted(failed) if r not in self.errors]
        others = sorted(set(failed) | set(self.errors))
        if own:
            rank = own[0]
            text = f"rank {rank} of {nproc} raised an error"
            detail = f"Its traceback:\n{self.errors[rank][0]}"
        elif silent:
            rank = silent[0]
            text = f"rank {rank} of {nproc} died (exit code {failed[rank]})"
            detail = "It left no traceback (killed, out of memory, or os._exit)."
        else:
            rank = others[0]
            text = f"rank {rank} of {nproc} lost its peers"
            detail = f"Its traceback:\n{self.errors[rank][0]}"
        rest = [r for r in others if r != rank]
        also = f" (ranks {rest} failed after it)" if rest else ""
        return RankFailedError(f"{text}{also}; the other ranks were stopped. {detail}")


def run_local(
    fn: Callable[..., Any],
    nproc: int = 2,
    args: tuple[Any, ...] = (),
    timeout_s: float | None = 600.0,
    threads: int | None = None,
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``nproc`` spawned processes in one gloo process group on
    localhost and return their results by rank (tensors come back as tensors). ``fn`` must be
    importable (a module-level function). Each rank gets ``threads`` torch threads (default:
    the cores shared out). A rank that raises or dies stops the others and raises
    :class:`RankFailedError` naming it; so does running past ``timeout_s`` (None: no
    deadline for the job; a collective still gives up after 30 minutes without its peers).

    >>> run_local(_double, nproc=2, args=(21,))  # doctest: +SKIP
    [42, 42]
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be at least 1")
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context("spawn")
    messages = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, fn, nproc, port, timeout_s, threads, messages, args))
        for r in range(nproc)
    ]
    job = _Job(procs, messages)
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s if timeout_s is not None else math.inf
    try:
        while any(p.is_alive() for p in procs):
            job.drain()
            if job.failed() or job.errors:
                grace = time.monotonic() + 2.0  # let the others report what they saw
                while time.monotonic() < grace and any(p.is_alive() for p in procs):
                    time.sleep(0.05)
                    job.drain()
                job.stop()
                job.drain()
                raise job.failure(nproc)
            if time.monotonic() > deadline:
                running = [r for r, p in enumerate(procs) if p.is_alive()]
                raise RankFailedError(
                    f"ranks {running} of {nproc} still running after timeout_s={timeout_s}; "
                    "stopped them (a collective waiting on a missing rank, or a job longer "
                    "than the timeout)"
                )
            time.sleep(0.05)
        job.drain()
        if job.failed() or job.errors:
            raise job.failure(nproc)
    finally:
        job.stop()
    missing = [r for r in range(nproc) if r not in job.results]
    if missing:
        raise RankFailedError(f"ranks {missing} of {nproc} finished without a result")
    return [_from_host(job.results[r]) for r in range(nproc)]


def _double(rank: int, x: int) -> int:
    return 2 * x
