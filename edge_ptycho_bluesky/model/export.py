"""Export PtychoNN networks to ONNX (dynamic batch) and save state dicts.

``torch.onnx.export`` in torch 2.13 has two exporters.  The default here is the
``torch.export``-based one (``dynamo=True``, needs ``onnxscript``): it is the maintained path,
keeps the parameter names as initializer names, and writes a single self-contained file with
``external_data=False``.  It implements opset 18 and converts down when a lower ``opset`` is
asked for (17 by default, which TensorRT 10 and every ONNX Runtime of the last years read).
The legacy TorchScript exporter (``exporter="legacy"``) is kept as a fallback; torch marks it
deprecated.  Both produce graphs that ONNX Runtime runs to within 1e-6 of torch for
PtychoNN 2.0 (bilinear upsampling becomes ``Resize(mode="linear",
coordinate_transformation_mode="half_pixel")``).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from ..files import atomic_write
from .errors import InvalidModelError
from .ptychonn import FRAME_SHAPE, count_parameters, phase_of

__all__ = ["export_onnx", "save_state_dict"]

logger = logging.getLogger(__name__)


def _output_names(model: nn.Module, example: torch.Tensor) -> list[str]:
    with torch.inference_mode():
        out = model(example)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError(f"expected the model to return phase or (amplitude, phase), got {len(out)} outputs")
        return ["amplitude", "phase"]
    return ["phase"]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    frame_shape: tuple[int, int] = FRAME_SHAPE,
    exporter: Literal["dynamo", "legacy"] = "dynamo",
    verify: bool = True,
    atol: float = 1e-3,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Export a PtychoNN network to a self-contained ONNX file and check it.

    The graph has one input ``"diffraction"`` ``(B, 1, H, W) float32`` and the output
    ``"phase"`` (or ``"amplitude"``, ``"phase"`` for the two-headed PtychoNN), ``B`` dynamic
    when ``dynamic_batch``.  The file passes ``onnx.checker.check_model(full_check=True)``,
    carries metadata (``model_class``, ``n_parameters``, ``frame_shape`` and ``metadata``),
    and is written atomically (a temporary file renamed into place).

    Parameters
    ----------
    model : torch.nn.Module
        The network; a CPU float32 copy in eval mode is exported, the model itself is untouched.
    path : str or Path
        Destination ``.onnx`` file; parent directories are created.
    opset : int
        ONNX opset (>= 13).
    dynamic_batch : bool
        Make the batch axis dynamic; otherwise it is fixed at ``batch_size``.
    batch_size : int
        Batch of the example input (and the fixed batch when not ``dynamic_batch``).
    frame_shape : (int, int)
        ``(H, W)`` of the input frames.
    exporter : {"dynamo", "legacy"}
        ``torch.onnx.export(dynamo=True)`` or the TorchScript exporter.
    verify : bool
        Run the file in ONNX Runtime on a random batch and compare with torch (``atol``).
    atol : float
        Tolerance of the verification in radians (default 1e-3, 0.03 % of the +-pi range: float32
        sums in a different order differ by ~1e-4 on untrained, He-initialised weights).
    metadata : dict of str to str or None
        Extra ``metadata_props`` (e.g. model version, training scan ids).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InvalidModelError
        The written graph fails the checker or the numerical verification.
    """
    if opset < 13:
        raise ValueError(f"opset must be >= 13, got {opset}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter must be 'dynamo' or 'legacy', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a CPU float32 copy in eval mode: the caller's model (maybe mid-training, maybe on
    # a GPU) is left untouched.
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    example = torch.rand((batch_size, 1, *frame_shape), generator=torch.Generator().manual_seed(0)) * 100
    output_names = _output_names(cpu_model, example)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".onnx.tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _run_exporter(cpu_model, example, tmp, opset, dynamic_batch, exporter, output_names)
        proto = onnx.load(str(tmp))
        props = {
            "model_class": type(model).__name__,
            "n_parameters": str(count_parameters(model)),
            "frame_shape": "x".join(str(s) for s in frame_shape),
            "exporter": exporter,
            "producer": "edge_ptycho_bluesky",
            **(metadata or {}),
        }
        onnx.helper.set_model_props(proto, props)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:
            raise InvalidModelError(f"the exported graph fails onnx.checker: {exc}") from exc
        got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if got != opset:
            logger.warning("asked for opset %d, the exporter wrote opset %s", opset, got)
        onnx.save(proto, str(tmp))
        if verify:
            _verify(cpu_model, tmp, frame_shape, batch_sizes=(1, 3) if dynamic_batch else (batch_size,), atol=atol)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("exported %s to %s (opset %d, dynamic batch %s)", type(model).__name__, path, opset, dynamic_batch)
    return path


def _run_exporter(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    dynamic_batch: bool,
    exporter: str,
    output_names: list[str],
) -> None:
    with warnings.catch_warnings():
        # torch's own exporters warn about their internals (deprecations, tracer notes); none
        # of it concerns the caller, and filterwarnings="error" must not turn it into failures.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        if exporter == "dynamo":
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=["diffraction"],
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
                optimize=True,
            )
        else:
            axes = {name: {0: "batch"} for name in ["diffraction", *output_names]} if dynamic_batch else None
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["diffraction"],
                output_names=output_names,
                dynamic_axes=axes,
                do_constant_folding=True,
            )


def _verify(model: nn.Module, path: Path, frame_shape: tuple[int, int], batch_sizes: tuple[int, ...], atol: float) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for b in batch_sizes:
        x = (rng.random((b, 1, *frame_shape)) * 1000).astype(np.float32)
        got = session.run(["phase"], {"diffraction": x})[0]
        with torch.inference_mode():
            want = phase_of(model(torch.from_numpy(x))).numpy()
        err = float(np.abs(got - want).max())
        if got.shape != want.shape or err > atol:
            raise InvalidModelError(
                f"exported graph differs from torch: shape {got.shape} vs {want.shape}, max |diff| {err:.3g} > {atol}"
            )
        logger.debug("export verified at batch %d: max |diff| %.3g", b, err)


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save ``model.state_dict()`` (CPU tensors) atomically, for ``torch.load(weights_only=True)``.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())
    return path
