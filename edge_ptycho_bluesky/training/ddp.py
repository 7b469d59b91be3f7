"""Data-parallel training with torch DDP, launched by torchrun.

Run under ``torchrun`` (``python -m torch.distributed.run``)::

    torchrun --standalone --nproc_per_node 2 -m edge_ptycho_bluesky.training.ddp \\
        --corpus scan1.npz scan2.npz --out run1 --epochs 50 --batch-size 64

or from Python with :func:`run_torchrun`, which does exactly that in a subprocess. Every process
(rank) reads the whole corpus, builds the same model (same seed; DDP also broadcasts rank 0's
weights), and trains with the loop of :func:`edge_ptycho_bluesky.training.loop.fit`:

* the backend is ``gloo`` on the CPU and ``nccl`` on CUDA (one GPU per rank, ``LOCAL_RANK``);
* each rank runs one torch thread (``torch.set_num_threads(1)``; torchrun sets
  ``OMP_NUM_THREADS=1`` as well);
* ``--batch-size`` is the *global* batch: each of ``P`` ranks takes ``batch_size / P`` samples
  per step, drawn by a ``DistributedSampler`` over the epoch's training split, and DDP averages
  the gradients. The validation split is drawn from the same seeded generator on every rank, and
  the validation loss is summed over the ranks' shards (``all_reduce``), so every rank keeps the
  same best-validation state.

Because ``DistributedSampler`` deals one shuffled permutation out round-robin
(``indices[rank::P]``), the union of the ranks' local batches at step ``k`` is exactly the batch
a single process draws at step ``k`` with the same seed. With equal local batch sizes the
averaged gradient is the single-process gradient up to floating-point summation order, so one
rank and several ranks follow the same trajectory: tests/test_trainer.py checks that the losses
agree within 1e-3 relative (measured: 2e-6 after two epochs). A last batch that does not split
evenly across the ranks (``DistributedSampler`` pads it by repeating samples) breaks the exact
equality slightly; that is the only approximation.

Rank 0 writes into ``--out``: ``model.pt`` (best-validation state dict, for
``torch.load(weights_only=True)``), ``result.json`` (:meth:`TrainResult.to_json_dict`) and the
loss curves ``curves.png/.json/.csv``. Every rank then touches ``rank<N>.done``: a torchrun
that exits nonzero during gloo's teardown, after every rank finished and saved, keeps its result.

The options of the entry point are defined in :mod:`edge_ptycho_bluesky.training.ddp_cli`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import DistInfo, TrainConfig, TrainResult
from .corpus import TrainingCorpus
from .ddp_cli import build_parser
from .loop import fit, load_state_dict, prepare_inputs

logger = logging.getLogger(__name__)

__all__ = ["MODEL_FILE", "RESULT_FILE", "main", "run_torchrun"]

#: Files rank 0 writes into ``--out``.
MODEL_FILE = "model.pt"
RESULT_FILE = "result.json"
PROBE_FILE = "probe.npy"


def _dist_info_from_env() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one rank (also works as a single process without torchrun)."""
    args = build_parser().parse_args(argv)
    info = _dist_info_from_env()
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO) if info.is_main
        else logging.WARNING,
        format=f"%(asctime)s rank{info.rank} %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)
    config = TrainConfig.from_dict({**args.config, "num_threads": 1})
    from ..model import build_model

    if info.distributed:
        backend = "nccl" if config.device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
        logger.info("process group: %s backend, %d ranks", backend, info.world_size)
    try:
        corpus = TrainingCorpus.from_files(args.corpus)
        frames, phases = corpus.arrays()
        inputs = prepare_inputs(frames, config.count_scale)
        torch.manual_seed(config.seed)
        model = build_model(args.model, **args.model_kwargs)
        initial = load_state_dict(args.init) if args.init is not None else None
        result = fit(
            model, inputs, phases, config, initial_state=initial, dist_info=info,
            split_seed=args.split_seed, curves_dir=args.out if info.is_main else None,
            description=f"DDP x{info.world_size} ({len(frames)} frames)",
            probe=None if args.probe is None else np.load(args.probe),
        )
        if info.is_main:
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save(result.state_dict, args.out / MODEL_FILE)
            summary = {**result.to_json_dict(), "training_data": corpus.uids}
            (args.out / RESULT_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
            logger.info("rank 0 wrote %s and %s", args.out / MODEL_FILE, args.out / RESULT_FILE)
        if info.distributed:
            dist.barrier()
        # Training is finished and saved: say so before the process group's teardown, which
        # gloo can abort ("terminate called without an active exception") after the work is done.
        (args.out / _done_file(info.rank)).touch()
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _done_file(rank: int) -> str:
    return f"rank{rank}.done"


def run_torchrun(
    corpus_files: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    nproc: int = 2,
    config: TrainConfig | None = None,
    initial_state: str | os.PathLike[str] | None = None,
    model: str = "ptychonn2",
    model_kwargs: dict[str, object] | None = None,
    split_seed: int | None = None,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    probe: Any = None,
) -> TrainResult:
    """Train with ``torchrun --standalone --nproc_per_node nproc`` in a subprocess.

    Parameters
    ----------
    corpus_files : sequence of path-like
        Labelled scan files.
    out : path-like
        Output folder (see the module notes).
    nproc : int
        Processes (ranks) on this machine.
    config : TrainConfig, optional
        Settings (``num_threads`` is forced to 1 per rank).
    initial_state : path-like, optional
        Warm-start state dict file.
    model : str
        Architecture name.
    model_kwargs : dict, optional
        Extra ``build_model`` arguments (JSON-serialisable).
    split_seed : int, optional
        Seed of the validation splits and batch order.
    timeout_s : float, optional
        Kill the run after this many seconds (``subprocess.TimeoutExpired``).
    env : dict, optional
        Extra environment variables.
    probe : (H, W) complex, optional
        The probe in the units of the network input, for the physics losses.

    Returns
    -------
    TrainResult
        Read back from ``out/result.json`` and ``out/model.pt``.

    Raises
    ------
    RuntimeError
        When torchrun exits with an error (its output's tail is in the message).
    """
    config = config if config is not None else TrainConfig()
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(nproc),
        "-m", "edge_ptycho_bluesky.training.ddp",
        "--corpus", *[str(f) for f in corpus_files],
        "--out", str(out),
        "--model", model,
        "--model-kwargs", json.dumps(model_kwargs or {}),
        "--config", json.dumps(config.to_dict()),  # every setting, the loss included
    ]
    if split_seed is not None:
        cmd += ["--split-seed", str(split_seed)]
    if initial_state is not None:
        cmd += ["--init", str(initial_state)]
    if probe is not None:
        np.save(out / PROBE_FILE, np.asarray(probe, dtype=np.complex64))
        cmd += ["--probe", str(out / PROBE_FILE)]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    src = str(Path(__file__).resolve().parents[2])
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (src, run_env.get("PYTHONPATH")) if p)
    for stale in [out / RESULT_FILE, *(out / _done_file(r) for r in range(nproc))]:
        stale.unlink(missing_ok=True)
    logger.info("launching: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    finished = all((out / _done_file(r)).is_file() for r in range(nproc))
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        if not (finished and (out / RESULT_FILE).is_file()):
            raise RuntimeError(f"torchrun exited with status {proc.returncode}:\n{tail}")
        logger.warning("torchrun exited with status %d after every rank had finished and saved; "
                       "the result is kept. Its output's tail:\n%s", proc.returncode, tail[-1000:])
    data = json.loads((out / RESULT_FILE).read_text(encoding="utf-8"))
    state = load_state_dict(out / MODEL_FILE)
    result = TrainResult.from_json_dict(data, state)
    result.curves.update({ext: out / f"curves.{ext}" for ext in ("png", "json", "csv")
                          if (out / f"curves.{ext}").is_file()})
    return result


if __name__ == "__main__":
    sys.exit(main())
