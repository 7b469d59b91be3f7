"""``edge-ptycho model ...``: inspect, convert/export and run PtychoNN models.

Subcommands::

    edge-ptycho model info MODEL                      # ONNX graph / state-dict summary, engines here
    edge-ptycho model export SRC OUT.onnx [--opset 17] [--fixed-batch N]
    edge-ptycho model infer MODEL FRAMES.npz --key reciprocal --out phase.npy [--engine auto]
    edge-ptycho model quantize MODEL.onnx FRAMES.npz --key reciprocal --reduce mean --out INT8.onnx

``SRC`` of ``export`` is a PtychoNN 2.0 ONNX file (e.g. the paper's fixed-batch
``ptychoNN_8.onnx``, re-exported with a dynamic batch) or a state dict (``--name``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from .engines import available_engines, load_engine
from .export import export_onnx
from .onnx_weights import onnx_graph_info, ptychonn2_from_onnx
from .contract import InputContract
from .ptychonn import count_parameters, load_model
from .quantize import quantize_and_check

logger = logging.getLogger(__name__)

__all__ = ["add_subcommand"]


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``model`` and its subcommands on the top-level CLI's subparsers."""
    parser = subparsers.add_parser("model", help="inspect, export and run PtychoNN models")
    sub = parser.add_subparsers(dest="model_command", required=True)

    info = sub.add_parser("info", help="summarise an ONNX or state-dict model and the engines available here")
    info.add_argument("model", type=Path)
    info.add_argument("--name", default="ptychonn2", help="architecture of a state-dict file")
    info.set_defaults(func=_info)

    export = sub.add_parser("export", help="export a model to a dynamic-batch ONNX file")
    export.add_argument("source", type=Path, help="PtychoNN 2.0 .onnx file or state dict (.pt/.pth)")
    export.add_argument("out", type=Path, help="destination .onnx file")
    export.add_argument("--name", default="ptychonn2", help="architecture of a state-dict source")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--fixed-batch", type=int, default=None, help="fixed batch instead of a dynamic one")
    export.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    export.set_defaults(func=_export)

    infer = sub.add_parser("infer", help="phase-retrieve frames from an .npy/.npz file")
    infer.add_argument("model", type=Path)
    infer.add_argument("frames", type=Path, help=".npy array or .npz archive of frames (N, H, W)")
    infer.add_argument("--key", default=None, help="array name inside an .npz (default: the first)")
    infer.add_argument("--out", type=Path, required=True, help="destination .npy of phases (N, 128, 128)")
    infer.add_argument("--engine", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto")
    infer.add_argument("--reduce", choices=("sum", "mean"), default="sum", help="how binning combines counts")
    infer.add_argument("--crop-to", type=int, default=None, help="centre-crop frames first (512 for 516 x 516)")
    infer.add_argument("--scale", type=float, default=None, help="count scale factor applied after binning")
    infer.set_defaults(func=_infer)

    quantize = sub.add_parser("quantize", help="static int8 quantization (ONNX Runtime), calibrated on frames")
    quantize.add_argument("model", type=Path, help="float32 dynamic-batch ONNX (e.g. from `model export`)")
    quantize.add_argument("frames", type=Path, help=".npy or .npz frames (N, H, W), preprocessed as the model "
                                                   "expects: half calibrate, the other half measure the agreement")
    quantize.add_argument("--key", default=None, help="array name inside an .npz (default: the first)")
    quantize.add_argument("--out", type=Path, required=True, help="destination int8 .onnx")
    quantize.add_argument("--reduce", choices=("sum", "mean"), default="sum", help="how binning combines counts")
    quantize.add_argument("--crop-to", type=int, default=None, help="centre-crop frames first")
    quantize.add_argument("--scale", type=float, default=None, help="count scale factor applied after binning")
    quantize.set_defaults(func=_quantize)


def _info(args: argparse.Namespace) -> int:
    summary: dict[str, object] = {"model": str(args.model)}
    if args.model.suffix.lower() == ".onnx":
        info = onnx_graph_info(args.model)
        summary.update(
            opset=info.opset,
            producer=info.producer,
            input=[info.input_name, list(info.input_shape)],
            outputs=list(info.output_names),
            fixed_batch=info.fixed_batch,
            conv_layers=len(info.convs),
            parameters=sum(int(np.prod(c.weight_shape)) + (c.weight_shape[0] if c.bias_name else 0) for c in info.convs),
            initializer_elements=info.n_initializer_elements,
            resize=sorted({(r.mode, r.coordinate_transformation_mode) for r in info.resizes}),
        )
    else:
        summary["parameters"] = count_parameters(load_model(args.model, args.name))
    summary["engines"] = {k: (v or "available") for k, v in available_engines().items()}
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.source.suffix.lower() == ".onnx":
        model = ptychonn2_from_onnx(args.source)
    else:
        model = load_model(args.source, args.name)
    path = export_onnx(
        model,
        args.out,
        opset=args.opset,
        dynamic_batch=args.fixed_batch is None,
        batch_size=args.fixed_batch or 1,
        exporter=args.exporter,
        metadata={"source": args.source.name},
    )
    print(f"wrote {path}")
    return 0


def _load_frames(path: Path, key: str | None) -> np.ndarray:
    if path.suffix.lower() == ".npz":
        with np.load(path) as archive:
            return archive[key or archive.files[0]]
    return np.load(path)


def _network_input(frames: np.ndarray, args: argparse.Namespace) -> np.ndarray:
    """The frames as network input, with the binning and count scale given on the command line."""
    return InputContract(scale=args.scale, options={"reduce": args.reduce, "crop_to": args.crop_to}).prepare(frames)


def _infer(args: argparse.Namespace) -> int:
    frames = _load_frames(args.frames, args.key)
    engine = load_engine(args.model, args.engine)
    x = _network_input(frames, args)
    phase = engine.infer(x)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, phase)
    print(f"{engine.name}: {len(phase)} frames -> {args.out} (phase {phase.min():.3f} .. {phase.max():.3f} rad)")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    x = _network_input(_load_frames(args.frames, args.key), args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        path, score = quantize_and_check(args.model, args.out, x)
    except ValueError as exc:
        raise SystemExit(f"edge-ptycho model quantize: {exc}") from None
    print(f"wrote {path}: calibrated on {len(x) - int(score['frames'])} frames; on the other "
          f"{int(score['frames'])} its phase agrees with float32 to mean SSIM {score['ssim']:.4f} "
          f"(largest difference {score['max_abs_rad']:.3f} rad)")
    return 0
