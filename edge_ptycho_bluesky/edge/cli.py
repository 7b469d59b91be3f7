"""``edge-ptycho worker``: the edge inference worker as a process (also ``python -m
edge_ptycho_bluesky.edge.cli``, same options).

It serves pvAccess frames in, phase patches and status out, until SIGINT/SIGTERM or
``--duration``; see :mod:`edge_ptycho_bluesky.edge.worker` for the worker itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .model_source import FileModelSource, ModelSource, RegistryModelSource, engine_factory
from .pva_clients import PvaFrameSource
from .pva_servers import PvaPatchSink
from .transport import DEFAULT_INPUT_PV, DEFAULT_OUTPUT_PV, DEFAULT_STATUS_PV, loopback_env
from .worker import EdgeWorker
from .worker_config import WorkerConfig

__all__ = ["add_subcommand", "main", "run_worker"]

logger = logging.getLogger(__name__)

#: The subcommand's description (first line of its ``--help``).
DESCRIPTION = "The edge inference worker: frames in, phase patches out, every frame accounted for."


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--registry", type=Path, metavar="DIR",
                     help="model registry folder; the deployed version is hot-swapped on change")
    src.add_argument("--model", type=Path, metavar="FILE.onnx", help="one model file (no swap)")
    p.add_argument("--input", default=DEFAULT_INPUT_PV, metavar="PV",
                   help=f"NTNDArray frame channel (default {DEFAULT_INPUT_PV})")
    p.add_argument("--output", default=DEFAULT_OUTPUT_PV, metavar="PV",
                   help=f"phase patch channel served by the worker (default {DEFAULT_OUTPUT_PV})")
    p.add_argument("--status", default=DEFAULT_STATUS_PV, metavar="PV",
                   help=f"status channel served by the worker (default {DEFAULT_STATUS_PV})")
    p.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "torch", "tensorrt"),
                   help="inference engine (default auto: TensorRT > torch-CUDA > ONNX Runtime)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a partial batch waits for more frames (default 5)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="inference queue capacity; overflow is dropped as queue_full (default 256)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the engine (default: library default)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let ONNX Runtime's idle threads busy-wait (lower latency on a machine with "
                        "cores to spare; off by default: it starves the transport on a small one)")
    p.add_argument("--server-queue-size", type=int, default=1000,
                   help="pvAccess server-side monitor queue of the input (default 1000)")
    p.add_argument("--no-require-position", dest="require_position", action="store_false",
                   help="infer frames that carry no pos_x/pos_y attributes")
    p.add_argument("--scale", type=float, default=None,
                   help="count scale factor applied after binning (see model.preprocess)")
    p.add_argument("--position-attributes", default=None, metavar="X,Y",
                   help="NDAttribute names of the frame's x and y position when the frames carry no "
                        "pos_x/pos_y (e.g. SampleX,SampleY from an areaDetector NDAttributes file)")
    p.add_argument("--position-scale", type=float, default=1.0, metavar="F",
                   help="multiply those positions by F (units: e.g. 1e-3 for nm into um; default 1)")
    p.add_argument("--reference-exposure", type=float, default=None, metavar="SECONDS",
                   help="exposure the model was trained with, when its registry entry does not record "
                        "it: frames carrying an exposure_s attribute are scaled to it")
    p.add_argument("--crop-to", type=int, default=None,
                   help="centre-crop frames to this size before binning (e.g. 512 for 516 x 516)")
    p.add_argument("--status-period", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument("--poll-period", type=float, default=0.5,
                   help="registry poll period in seconds (default 0.5)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until SIGINT/SIGTERM)")
    p.add_argument("--stats-json", type=Path, default=None,
                   help="write the final statistics to this JSON file on exit")
    p.add_argument("--no-loopback", dest="loopback", action="store_false",
                   help="do not force pvAccess onto 127.0.0.1 (use the EPICS_PVA* environment)")
    p.add_argument("--log-level", default=None,
                   help="logging level, e.g. WARNING (default INFO, or the CLI's own setting)")


def _pair_of_names(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if len(names) != 2 or not all(names):
        raise SystemExit(f"edge-ptycho worker: --position-attributes takes two names X,Y, got {text!r}")
    return names  # type: ignore[return-value]


def _config_from_args(args: argparse.Namespace) -> WorkerConfig:
    pre: dict[str, Any] = {}
    if args.scale is not None:
        pre["scale"] = args.scale
    if args.crop_to is not None:
        pre["crop_to"] = args.crop_to
    return WorkerConfig(batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                        queue_size=args.queue_size, require_position=args.require_position,
                        preprocess_options=pre, status_period_s=args.status_period,
                        poll_period_s=args.poll_period, reference_exposure_s=args.reference_exposure,
                        position_attributes=_pair_of_names(args.position_attributes),
                        position_scale=args.position_scale)


def run_worker(args: argparse.Namespace) -> int:
    """Run the worker from parsed CLI arguments until a signal or ``--duration``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level:
        level = logging.getLevelName(str(args.log_level).upper())
        if not isinstance(level, int):
            print(f"edge-ptycho worker: unknown --log-level {args.log_level!r}", file=sys.stderr)
            return 2
        root.setLevel(level)
    if args.loopback:
        loopback_env()
    try:
        config = _config_from_args(args)
        factory = engine_factory(args.engine, args.threads, spinning=args.ort_spinning)
    except (ValueError, TypeError) as exc:
        print(f"edge-ptycho worker: {exc}", file=sys.stderr)
        return 2
    source: ModelSource
    if args.model is not None:
        source = FileModelSource(args.model, factory)
    else:
        try:
            source = RegistryModelSource(args.registry, factory)
        except ValueError as exc:  # RegistryError
            print(f"edge-ptycho worker: {exc}", file=sys.stderr)
            return 2
    worker = EdgeWorker(source, PvaFrameSource(args.input, server_queue_size=args.server_queue_size),
                        PvaPatchSink(args.output, args.status), config)
    done = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        print(json.dumps({"event": "started", "input": args.input, "output": args.output,
                          "status": args.status}), flush=True)
        done.wait(args.duration)
    finally:
        final = worker.stop(drain=True)
        for s, h in previous.items():
            signal.signal(s, h)
    record = final.to_dict()
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({"event": "stopped", **record}, default=str), flush=True)
    return 0


def add_subcommand(subparsers: Any) -> None:
    """Register ``edge-ptycho worker`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "worker", help="run the edge inference worker (pvAccess frames in, phase patches out)",
        description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run_worker)


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_ptycho_bluesky.edge.cli [options]`` (the options of ``edge-ptycho
    worker``)."""
    parser = argparse.ArgumentParser(prog="python -m edge_ptycho_bluesky.edge.cli",
                                     description="Edge inference worker.")
    _add_arguments(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
