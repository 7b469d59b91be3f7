"""Inference throughput of PtychoNN 2.0 per engine and batch size.

Engines measured (each available one):

* ``onnxruntime/exported`` -- the paper's weights re-exported with a dynamic batch
  (:func:`edge_ptycho_bluesky.model.export_onnx`);
* ``onnxruntime/paper-b8`` -- the paper's fixed-batch-8 ``ptychoNN_8.onnx`` as distributed
  (batches are split into chunks of 8 and the last chunk zero-padded, so batch 1 costs 8 frames);
* ``onnxruntime/fast``, ``onnxruntime/fast-int8`` -- the CPU variant ``ptychonn2-fast``
  (:class:`~edge_ptycho_bluesky.model.PtychoNNFast`; trained weights with ``--fast-weights``, else
  untrained: the speed does not depend on the weights), float32 and static int8;
* ``torch-cpu`` -- the torch model with the paper's weights;
* ``torch-cuda``, ``tensorrt-fp16`` -- where a CUDA GPU (and TensorRT) exist.

For every engine, thread count and batch size it runs batches for at least ``--seconds``
(after a warm-up) and repeats that ``--repeats`` times, reporting the best repeat (the CPU is
shared, so the best run is the closest to the machine's capability) and the median batch
latency of that repeat.  The machine's load average is printed before and after.

Usage::

    .venv/bin/python benchmarks/bench_infer.py --quick
    .venv/bin/python benchmarks/bench_infer.py --batches 1 8 --threads 1 --seconds 3

Without ``../shared/data/ptychoNN_8.onnx`` the model has random weights (timings are the same).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from records import record, write_json  # noqa: E402  (benchmarks/records.py)
from edge_ptycho_bluesky import FRAME_SIZE
from edge_ptycho_bluesky.model import (  # noqa: E402
    OnnxRuntimeEngine,
    TensorRTEngine,
    TorchEngine,
    available_engines,
    build_model,
    export_onnx,
    preprocess,
    ptychonn2_from_onnx,
)
from edge_ptycho_bluesky.model.quantize import quantize_and_check

PAPER_ONNX = ROOT.parent / "shared" / "data" / "ptychoNN_8.onnx"


def gflop_per_frame(model: nn.Module, shape: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)) -> float:
    """Multiply-adds x 2 of the convolutions for one frame, in GFLOP."""
    flops = 0
    hooks = []

    def hook(module: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal flops
        k = module.kernel_size[0] * module.kernel_size[1]
        flops += 2 * module.in_channels * module.out_channels * k * out.shape[-2] * out.shape[-1]

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
    with torch.inference_mode():
        model(torch.zeros(1, 1, *shape))
    for h in hooks:
        h.remove()
    return flops / 1e9


def measure(infer: Callable[[np.ndarray], np.ndarray], batch: int, seconds: float, repeats: int) -> tuple[float, float]:
    """Best frames/s over ``repeats`` runs of >= ``seconds`` each, and that run's median ms/batch."""
    x = (np.random.default_rng(0).random((batch, FRAME_SIZE, FRAME_SIZE)) * 500).astype(np.float32)
    for _ in range(2):
        infer(x)  # warm-up: allocations, kernel/primitive selection
    best_fps, best_median = 0.0, float("nan")
    for _ in range(repeats):
        times = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            infer(x)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - start >= seconds and len(times) >= 3:
                break
        fps = batch * len(times) / sum(times)
        if fps > best_fps:
            best_fps, best_median = fps, 1e3 * statistics.median(times)
    return best_fps, best_median


def make_int8(exported: Path, tmp: Path, agreement_out: dict[str, float]) -> Path:
    """Quantize ``exported`` to int8, calibrated on half of the real frames (``test235``, mean-binned
    to 128 x 128 as the paper's network expects); its agreement with float32 on the other half."""
    real = ROOT.parent / "shared" / "data" / "test235_truncated.npz"
    if real.is_file():
        x = preprocess(np.load(real)["reciprocal"], reduce="mean")
        source = "real frames test235, mean-binned 4 x 4"
    else:
        rng = np.random.default_rng(0)
        x = rng.poisson(20.0, (20, 1, FRAME_SIZE, FRAME_SIZE)).astype(np.float32)
        source = "Poisson noise frames (real frames absent)"
    path, score = quantize_and_check(exported, tmp / f"{exported.stem}_int8.onnx", x)
    agreement_out.update(score, source=source)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (1 s x 2 repeats)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op threads to try")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum time per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per point; the best is reported")
    parser.add_argument("--json", type=Path, default=None, help="write the records (bench.json format) here")
    parser.add_argument(
        "--engines", nargs="+",
        default=["onnxruntime/exported", "onnxruntime/int8", "onnxruntime/paper-b8", "onnxruntime/fast",
                 "onnxruntime/fast-int8", "torch-cpu", "torch-cuda", "tensorrt-fp16"]
    )
    parser.add_argument("--fast-weights", type=Path, default=None, help="trained ptychonn2-fast state dict (.pt)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.repeats = 1.0, 2

    if PAPER_ONNX.is_file():
        model = ptychonn2_from_onnx(PAPER_ONNX)
        weights = "paper's weights"
    else:
        torch.manual_seed(0)
        model = build_model("ptychonn2")
        weights = "random weights (paper ONNX absent)"
    gflop = gflop_per_frame(model)
    reasons = available_engines()
    tmp = Path(tempfile.mkdtemp(prefix="bench_infer_"))
    exported = export_onnx(model, tmp / "ptychonn2_dynamic.onnx")
    torch.manual_seed(0)
    fast = build_model("ptychonn2-fast")
    if args.fast_weights is not None:
        fast.load_state_dict(torch.load(args.fast_weights, map_location="cpu", weights_only=True))
    fast_exported = export_onnx(fast.eval(), tmp / "ptychonn2_fast.onnx")
    gflops = {name: gflop_per_frame(fast) for name in ("onnxruntime/fast", "onnxruntime/fast-int8")}

    print(f"# bench_infer  {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} logical CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    import onnxruntime

    print(f"# onnxruntime {onnxruntime.__version__}; model PtychoNN 2.0 ({weights}); {gflop:.3f} GFLOP/frame")
    print(f"# load average before: {os.getloadavg()}")
    print(f"# seconds/measurement {args.seconds}, best of {args.repeats}")
    print()
    print("| engine | threads | batch | frames/s | ms/frame | median ms/batch | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def row(name: str, threads: object, batch: int, fps: float, median: float) -> None:
        g = gflops.get(name, gflop)
        record("infer", engine=name, model=model_file.get(name, "ptychonn2 (paper weights, dynamic batch)"),
               batch=batch, threads=threads, fps=fps, latency_p50_ms=median, gflop_per_s=fps * g,
               ssim=agreements.get(name, {}).get("ssim"))
        print(f"| {name} | {threads} | {batch} | {fps:,.0f} | {1e3 / fps:.2f} | {median:.1f} | {fps * g:.0f} |",
              flush=True)

    model_file = {"onnxruntime/paper-b8": PAPER_ONNX.name,
                  "onnxruntime/int8": "ptychonn2 int8 (static, QDQ, calibrated on real frames)",
                  "onnxruntime/fast": "ptychonn2-fast (CPU variant)",
                  "onnxruntime/fast-int8": "ptychonn2-fast int8 (static, QDQ, calibrated on real frames)"}
    agreements: dict[str, dict[str, float]] = {}
    int8_paths: dict[str, Path] = {}
    for name, base in (("onnxruntime/int8", exported), ("onnxruntime/fast-int8", fast_exported)):
        if name in args.engines:
            agreements[name] = {}
            int8_paths[name] = make_int8(base, tmp, agreements[name])
            a = agreements[name]
            print(f"# {name} vs float32 on held-out frames: mean SSIM {a['ssim']:.4f}, max |difference| "
                  f"{a['max_abs_rad']:.3f} rad ({a['frames']:.0f} frames, {a['source']})")
    default_threads = torch.get_num_threads()
    for name in args.engines:
        if name.startswith("onnxruntime"):
            path = {"onnxruntime/exported": exported, "onnxruntime/paper-b8": PAPER_ONNX,
                    "onnxruntime/fast": fast_exported, **int8_paths}.get(name)
            if not path.is_file():
                print(f"| {name} | - | - | skipped: {path} absent | | | |")
                continue
            for threads in args.threads:
                engine = OnnxRuntimeEngine(path, intra_op_threads=threads)
                for batch in args.batches:
                    row(name, threads, batch, *measure(engine.infer, batch, args.seconds, args.repeats))
        elif name == "torch-cpu":
            engine_t = TorchEngine(model)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for batch in args.batches:
                    row(name, threads, batch, *measure(engine_t.infer, batch, args.seconds, args.repeats))
            torch.set_num_threads(default_threads)
        elif name == "torch-cuda":
            if reasons["torch-cuda"]:
                print(f"| {name} | - | - | skipped: {reasons['torch-cuda']} | | | |")
                continue
            for half in (False, True):
                engine_c = TorchEngine(model, device="cuda", half=half, channels_last=half)
                for batch in args.batches:
                    row(engine_c.name, "gpu", batch, *measure(engine_c.infer, batch, args.seconds, args.repeats))
        elif name.startswith("tensorrt"):
            if reasons["tensorrt"]:
                print(f"| {name} | - | - | skipped: {reasons['tensorrt']} | | | |")
                continue
            engine_r = TensorRTEngine(exported, fp16=True, cache_dir=tmp, max_batch=max(args.batches))
            for batch in args.batches:
                row(engine_r.name, "gpu", batch, *measure(engine_r.infer, batch, args.seconds, args.repeats))
        else:
            print(f"| {name} | - | - | unknown engine | | | |")
    print()
    print(f"# load average after: {os.getloadavg()}")
    write_json(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
