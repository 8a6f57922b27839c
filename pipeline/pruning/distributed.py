"""Data-parallel fine-tuning under torch.distributed (DDP, gloo on CPU): `fmap run --nproc N` or torchrun.

Only the training loop is distributed; the rest of the pipeline runs once, in rank 0, which alone
writes the run directory. Workers (ranks 1..N-1) run no pipeline: they wait for a training job.

- `session(nproc, threads)` (around `fmap run`): with `--nproc N`, start N-1 worker processes
  (`python -m pipeline.pruning.distributed`) and join them as rank 0 over TCP on 127.0.0.1; under
  torchrun (WORLD_SIZE > 1 in the environment) join the group torchrun set up, rank 0 only (the other
  ranks call `serve()` instead of running the pipeline). On exit rank 0 tells the workers to stop.
- `train(fn, model, teacher, split, ref, settings, console, source=None)`: how a stage calls its
  training loop (prune's `finetune`; QAT's `finetune` on its fake-quantized model). Outside a session
  it is just `fn(...)`. In a session rank 0 broadcasts the job (fn by reference, model, teacher,
  split, ref, settings), and every rank runs `fn` on a DDP-wrapped model and its own contiguous 1/N
  of every batch. A model that does not pickle (QAT's carries parametrizations and hooks with
  closures) goes as `source=(plain, build)`: the workers receive the picklable `plain` model and a
  module-level `build` and each makes its own `build(plain)`; DDP then starts every rank from rank
  0's parameters and buffers, and rank 0 trains the model it passed, in place. DDP averages the
  gradients, so a step uses the gradient of the whole batch as in one process. What differs from
  one process: BatchNorm statistics are per shard (no SyncBatchNorm; QAT's are frozen), augmentation
  draws per rank, and float sums change order; the quickstart's accuracy after fine-tuning matches
  one process within 0.5 point (tests/pruning/test_distributed.py), and QAT on 2 processes matches 1
  (tests/quantization/test_qat.py).
- Every rank evaluates the same validation set on the same weights, so model selection and early
  stopping decide alike on all ranks and no rank waits for a step the others skip. A `minutes`
  budget (prune's or QAT's) would end on each rank's own clock, and feature distillation's adapters
  are outside the DDP model: both are refused with `--nproc` (exit 2).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from pipeline.errors import BadInput
from pipeline.sources.data import Batch, DataSplit

BACKEND = "gloo"  # fmap fine-tunes on the CPU; NCCL needs the model on GPUs
TIMEOUT = datetime.timedelta(hours=6)  # workers wait for rank 0 through every stage before prune
_STATE: dict[str, Any] = {"world": 1, "rank": 0, "serving": False}


def world_size() -> int:
    return int(_STATE["world"])


def rank() -> int:
    return int(_STATE["rank"])


def launched_worker() -> bool:
    """True in a torchrun rank other than 0: it serves training jobs instead of running the pipeline."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0


class ShardedSplit(DataSplit):
    """This rank's contiguous 1/N of every batch of `inner`; lengths and batch size stay the global
    ones so every rank counts the same steps. A batch smaller than N is used whole by every rank."""

    def __init__(self, inner: DataSplit, rank: int, world: int) -> None:
        self.inner, self.rank, self.world = inner, rank, world
        self.name, self.num_samples, self.batch_size = inner.name, len(inner), inner.batch_size
        self.has_labels, self.num_classes = inner.has_labels, inner.num_classes

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        for x, y in self.inner.batches(batch_size):
            if len(x) < self.world:
                yield x, y
                continue
            xs = torch.tensor_split(x, self.world)
            ys = torch.tensor_split(y, self.world) if y is not None else [None] * self.world
            yield xs[self.rank], ys[self.rank]

    def first_batch(self, batch_size: int | None = None) -> Batch:
        return self.inner.first_batch(batch_size)


def check_settings(settings: Any, where: str = "prune.finetune") -> None:
    """What a distributed fine-tune cannot do (exit 2, before any step); `where` names the recipe keys."""
    if getattr(settings, "minutes", None) is not None:
        raise BadInput(f"{where}: minutes with --nproc > 1: each rank would stop on its own clock; "
                       "use epochs or steps")
    if getattr(settings, "feature_layers", ()):
        raise BadInput(f"{where}: feature_layers with --nproc > 1 is not supported (the adapters are "
                       "outside the DDP model)")


Build = Callable[[nn.Module], nn.Module]


def train(fn: Callable[..., dict[str, Any]], model: nn.Module, teacher: nn.Module | None, split: DataSplit,
          ref: Any, settings: Any, console: Any = None,
          source: tuple[nn.Module, Build] | None = None) -> dict[str, Any]:
    """Run `fn(model, teacher, split, ref, settings, console=...)`, data-parallel when in a session.

    `source=(plain, build)`, for a `model` that does not pickle: the workers get `plain` and the
    module-level `build` (by reference) instead, and train their own `build(plain)`; rank 0 trains `model`."""
    if world_size() <= 1:
        return fn(model, teacher, split, ref, settings, console=console)
    import torch.distributed as dist

    check_settings(settings, "fine-tune")
    if not _STATE["serving"]:  # rank 0: hand the job to the workers
        shipped, build = source if source is not None else (model, None)
        dist.broadcast_object_list([("train", fn, shipped, teacher, split, ref, settings, build)], src=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // world_size()))  # N ranks share the cores rank 0 had
    try:
        # DDP broadcasts rank 0's parameters and buffers: every rank starts from the same weights
        wrapped = nn.parallel.DistributedDataParallel(model)
        out = fn(wrapped, teacher, ShardedSplit(split, rank(), world_size()), ref, settings,
                 console=console if rank() == 0 else None)
    finally:
        torch.set_num_threads(threads)
    out["distributed"] = {"backend": BACKEND, "world_size": world_size(),
                          "note": "each rank trained on 1/N of every batch; loss history is rank 0's shard"}
    return out


def serve() -> int:
    """A worker rank: run every training job rank 0 broadcasts until it says stop."""
    import torch.distributed as dist

    _STATE["serving"] = True
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        job = box[0]
        if job is None or job[0] == "stop":
            break
        _, fn, model, teacher, split, ref, settings, build = job
        train(fn, build(model) if build is not None else model, teacher, split, ref, settings)
    dist.destroy_process_group()
    return 0


def serve_launched() -> int:
    """A torchrun rank other than 0 (`fmap run` started by torchrun): join the group and serve."""
    _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://")
    return serve()


def check_recipe(recipe: Any, nproc: int | None) -> None:
    """Refuse (exit 2, before any stage) what a distributed fine-tune cannot do."""
    world = nproc if nproc is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return
    for spec in recipe.stages:
        finetune = getattr(spec.config, "finetune", None) if spec.kind == "prune" else None
        if finetune is not None:
            check_settings(finetune)
        if spec.kind == "quantize" and getattr(spec.config, "method", None) == "qat":
            check_settings(spec.config.qat, "quantize.qat")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank_: int, world: int, init_method: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(BACKEND, init_method=init_method, rank=rank_, world_size=world, timeout=TIMEOUT)
    _STATE.update(world=world, rank=rank_)


@contextlib.contextmanager
def session(nproc: int | None, threads: int) -> Iterator[None]:
    """Rank 0's side of a distributed run (see the module docstring); nothing when single-process."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc is not None and nproc < 1:
        raise BadInput(f"--nproc must be at least 1, got {nproc}")
    if nproc is not None and nproc > 1 and env_world > 1:
        raise BadInput("--nproc under torchrun: torchrun already starts the processes (drop --nproc)")
    world = nproc if nproc is not None and nproc > 1 else env_world
    if world <= 1:
        yield
        return
    procs: list[subprocess.Popen] = []
    if env_world > 1:
        _init(int(os.environ.get("RANK", "0")), env_world, "env://")
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        worker_threads = str(max(1, threads // world))
        env = {**os.environ, "OMP_NUM_THREADS": worker_threads, "PYTHONPATH": os.pathsep.join(sys.path)}
        procs = [subprocess.Popen([sys.executable, "-m", "pipeline.pruning.distributed", init, str(r), str(world),
                                   worker_threads], env=env, stdin=subprocess.DEVNULL) for r in range(1, world)]
        _init(0, world, init)
    ok = False
    try:
        yield
        ok = True
    finally:
        _stop(procs, ok)


def _stop(procs: list[subprocess.Popen], ok: bool) -> None:
    """Tell the workers to stop (or, after a failure in rank 0, end them: they may wait in a collective)."""
    import torch.distributed as dist

    if ok:
        with contextlib.suppress(Exception):
            dist.broadcast_object_list([("stop",)], src=0)
    if not ok:
        for p in procs:
            p.kill()
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    _STATE.update(world=1, rank=0)


def _worker_main(argv: list[str]) -> int:
    """`python -m pipeline.pruning.distributed INIT RANK WORLD THREADS`: one `--nproc` worker."""
    init, rank_, world, threads = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    torch.set_num_threads(threads)
    _init(rank_, world, init)
    return serve()


if __name__ == "__main__":  # run the imported module, so `rank()` answers the same wherever it is asked
    from pipeline.pruning import distributed as _module

    raise SystemExit(_module._worker_main(sys.argv[1:]))
