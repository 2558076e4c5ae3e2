"""Run a function on N local processes joined in one torch.distributed process group, failing fast.

What it is
    ``launch(fn, world_size, *args)`` starts ``world_size`` processes on this machine, joins them in a
    process group (gloo by default, so it works on any CPU), calls ``fn(rank, world_size, *args)`` in each,
    and returns the ranks' return values as a list indexed by rank. It is what the tests, the notebooks and a
    reader's own experiments use to try expert parallelism or distributed Muon on a laptop; ``torchrun`` does
    the same job for real clusters (the modules of glm5_ref.distributed only need an initialised group).

Failing fast, never hanging
    A distributed job whose rank 1 raised leaves rank 0 blocked in its next collective. Here every rank
    reports back through its own pipe, either ("ok", result) or ("error", traceback); the parent waits on
    the pipes and on the processes themselves, and as soon as one rank reports an error, or dies without
    reporting (a segfault, os._exit), it terminates the others and raises ``RankFailedError`` carrying that
    rank's traceback. Two clocks bound everything else: ``timeout`` for the whole job (``TimeoutError`` naming
    the ranks still running) and ``pg_timeout`` for each collective inside the group (a rank stuck in a
    collective whose peer never arrives raises there).

Choices
    * Rendezvous through a ``TCPStore`` that the parent hosts on 127.0.0.1 with port 0 (the kernel picks a
      free port): no "pick a free port, close it, hope nobody takes it" race between concurrent jobs.
    * "spawn" start method by default: each child imports torch afresh, which is safe on every OS whatever
      threads the parent runs, but costs seconds per rank (torch, then torch._dynamo, which the first
      optimizer imports). "forkserver" pays that once: a fresh server process imports torch, torch._dynamo,
      glm5_ref.distributed and ``preload`` (the module defining fn, say), and every rank of every later job
      forks from it in milliseconds; the server has no threads of the caller's, so the fork is safe, and it
      exits with the caller. "fork" forks the caller itself: fastest, but unsafe from a multi-threaded
      process (pytest-xdist workers, notebooks with background threads): use it for scripts only.
    * ``threads`` (default 1) intra-op threads per child: N ranks on a few cores would otherwise fight over
      them with OpenMP.
    * Return values travel as ordinary pickles (tensors included), so they outlive the process that made them.
    * gloo is told to use the loopback interface (GLOO_SOCKET_IFNAME, unless already set): machines whose
      hostname does not resolve to a reachable address would otherwise fail to connect.

fn must be importable by the children under "spawn" and "forkserver": a function typed into a notebook cell
is not (it lives in the kernel's __main__); put it in a module, or use "fork" from a plain script.

Not handled: several machines (use torchrun), GPUs per rank (pass backend="nccl" and pick the device in fn),
restarting failed ranks (elastic training).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
FORKSERVER_PRELOAD = ("torch", "torch.distributed", "torch._dynamo", "glm5_ref.distributed")


class RankFailedError(RuntimeError):
    """A rank raised (or died); ``.rank`` is its number and the message carries its traceback."""

    def __init__(self, rank: int, world_size: int, detail: str):
        super().__init__(f"rank {rank} of {world_size} failed:\n{detail}")
        self.rank = rank


def _positive(name: str, value, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        raise ValueError(f"launch {name}: expected a positive {'integer' if kind is int else 'number'}, "
                         f"got {value!r}")


def _child(fn, rank: int, world_size: int, port: int, args: tuple, conn, backend: str, pg_timeout: float,
           threads: int) -> None:
    """Body of one rank: join the group, run fn, send ("ok", pickle) or ("error", traceback) to the parent."""
    try:
        torch.set_num_threads(threads)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
        timeout = datetime.timedelta(seconds=pg_timeout)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        dist.barrier()  # nobody tears the group down while a peer still reads from it
        message = ("ok", pickle.dumps(result))
    except BaseException:  # noqa: BLE001 - everything, KeyboardInterrupt included, goes back to the parent
        message = ("error", traceback.format_exc())
    try:
        conn.send(message)
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout: float = 120.0, pg_timeout: float | None = None,
           backend: str = "gloo", start_method: str = "spawn", threads: int = 1, preload=()) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes in one process group.

    fn must be picklable (defined at module level) and return something picklable. Returns the ranks'
    results, indexed by rank. Raises RankFailedError (the first rank to fail, with its traceback) or
    TimeoutError (after ``timeout`` seconds; ``pg_timeout``, default ``timeout``, bounds each collective).
    ``preload``: modules the forkserver imports once (start_method="forkserver" only; module docstring).
    """
    _positive("world_size", world_size, int)
    _positive("timeout", timeout)
    pg_timeout = timeout if pg_timeout is None else pg_timeout
    _positive("pg_timeout", pg_timeout)
    _positive("threads", threads, int)
    if not callable(fn):
        raise TypeError(f"launch fn: expected a callable, got {type(fn).__name__}")
    if start_method not in mp.get_all_start_methods():
        raise ValueError(f"launch start_method: expected one of {mp.get_all_start_methods()}, got {start_method!r}")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":  # only heeded before the server's first start
        ctx.set_forkserver_preload([*FORKSERVER_PRELOAD, *preload])
    store = dist.TCPStore(HOST, 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout))  # port 0: the kernel picks a free one
    procs, conns = [], []
    try:
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, name=f"glm5-rank{rank}", daemon=True,
                            args=(fn, rank, world_size, store.port, args, send, backend, pg_timeout, threads))
            p.start()
            send.close()  # the parent keeps only the reading end: EOF once the child is gone
            procs.append(p)
            conns.append(recv)
        return _collect(procs, conns, world_size, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
        del store


def _collect(procs, conns, world_size: int, timeout: float) -> list:
    """Wait for every rank's message; raise on the first error, on a silent death, or at the deadline."""
    deadline = time.monotonic() + timeout
    results: dict[int, object] = {}
    pending = dict(enumerate(conns))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"launch: ranks {sorted(pending)} of {world_size} still running after {timeout} s "
                               "(a deadlock, e.g. a collective that not every rank called?)")
        ready = wait(list(pending.values()), timeout=left)
        for rank in [r for r, c in pending.items() if c in ready]:
            try:
                status, payload = pending.pop(rank).recv()
            except EOFError:  # the pipe closed without a message: the process died
                procs[rank].join(timeout=5)
                raise RankFailedError(rank, world_size, f"the process exited with code {procs[rank].exitcode} "
                                                        "without reporting (killed, or crashed in C code)") from None
            if status == "error":
                raise RankFailedError(rank, world_size, payload)
            results[rank] = pickle.loads(payload)
    return [results[r] for r in range(world_size)]
