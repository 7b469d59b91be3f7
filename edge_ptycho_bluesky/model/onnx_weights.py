"""Read ONNX graphs of PtychoNN networks and load their weights into the torch models.

The paper's trained network is distributed only as ONNX (``ptychoNN_8.onnx``: opset 12,
fixed batch 8).  :func:`onnx_graph_info` summarises such a graph (inputs, convolutions,
``Resize`` settings, op sequence); :func:`load_onnx_weights` copies the convolution weights
into a torch network by graph order, checking every shape and the upsampling mode; and
:func:`ptychonn2_from_onnx` builds a :class:`~edge_ptycho_bluesky.model.ptychonn.PtychoNN2`
of the right width from the graph and loads it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

from .errors import InvalidModelError

if TYPE_CHECKING:  # torch only where weights are loaded: reading a graph needs onnx alone
    from torch import nn

    from .ptychonn import PtychoNN2

__all__ = [
    "ConvSpec",
    "OnnxGraphInfo",
    "ResizeSpec",
    "load_onnx_weights",
    "onnx_graph_info",
    "ptychonn2_from_onnx",
    "read_onnx",
]

logger = logging.getLogger(__name__)

# Resize coordinate modes that equal torch's bilinear upsampling with align_corners=False for
# an integer scale factor ("pytorch_half_pixel" differs from "half_pixel" only for outputs of
# length 1).
_ALIGN_CORNERS_FALSE = ("half_pixel", "pytorch_half_pixel")
_IGNORED_OPS = ("Constant", "Identity")


@dataclass(frozen=True)
class ConvSpec:
    """One ``Conv`` node: initializer names and shapes, and its attributes."""

    weight_name: str
    weight_shape: tuple[int, ...]
    bias_name: str | None
    kernel_shape: tuple[int, ...]
    pads: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int


@dataclass(frozen=True)
class ResizeSpec:
    """One ``Resize`` node's interpolation settings and scales (``None`` when given as sizes)."""

    mode: str
    coordinate_transformation_mode: str
    scales: tuple[float, ...] | None


@dataclass(frozen=True)
class OnnxGraphInfo:
    """Summary of an ONNX graph, as :func:`onnx_graph_info` reads it.

    Attributes
    ----------
    input_shape, output_shape : tuple of (int or None)
        ``None`` marks a dynamic (symbolic) axis.
    fixed_batch : int or None
        Leading input dimension when it is fixed (8 for the paper's file), else ``None``.
    n_initializer_elements : int
        Elements of all initializers (parameters plus constants such as Resize scales).
    ops : tuple of str
        Node op types in graph order, ``Constant``/``Identity`` left out.
    """

    opset: int
    producer: str
    input_name: str
    input_shape: tuple[int | None, ...]
    output_names: tuple[str, ...]
    output_shape: tuple[int | None, ...]
    fixed_batch: int | None
    n_initializer_elements: int
    convs: tuple[ConvSpec, ...]
    resizes: tuple[ResizeSpec, ...]
    ops: tuple[str, ...]


def read_onnx(path: str | Path) -> onnx.ModelProto:
    """Load and check an ONNX file.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    InvalidModelError
        If the file is truncated, corrupt or fails ``onnx.checker``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, ...
        raise InvalidModelError(
            f"{path} is not a valid ONNX model (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    if not proto.graph.node:
        raise InvalidModelError(f"{path} holds an empty ONNX graph")
    return proto


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | None, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim
    )


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _constant_values(proto: onnx.ModelProto) -> dict[str, NDArray[np.generic]]:
    """Values of initializers and ``Constant`` node outputs, by tensor name."""
    values = {name: numpy_helper.to_array(t) for name, t in _initializers(proto).items()}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    out: dict[str, object] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def onnx_graph_info(model: str | Path | onnx.ModelProto) -> OnnxGraphInfo:
    """Summarise an ONNX graph: I/O, convolutions, Resize settings, op sequence.

    Parameters
    ----------
    model : str, Path or onnx.ModelProto
        A file (read with :func:`read_onnx`) or a loaded model.
    """
    proto = model if isinstance(model, onnx.ModelProto) else read_onnx(model)
    graph = proto.graph
    inits = _initializers(proto)
    inputs = [i for i in graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InvalidModelError(f"expected one graph input, found {[i.name for i in inputs]}")
    consts = _constant_values(proto)
    convs: list[ConvSpec] = []
    resizes: list[ResizeSpec] = []
    for node in graph.node:
        attrs = _attrs(node)
        if node.op_type == "Conv":
            if node.input[1] not in inits:
                raise InvalidModelError(f"Conv node {node.name!r} has a non-constant weight {node.input[1]!r}")
            weight = inits[node.input[1]]
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            convs.append(
                ConvSpec(
                    weight_name=node.input[1],
                    weight_shape=tuple(weight.dims),
                    bias_name=bias,
                    kernel_shape=tuple(attrs.get("kernel_shape", tuple(weight.dims[2:]))),  # type: ignore[arg-type]
                    pads=tuple(attrs.get("pads", (0, 0, 0, 0))),  # type: ignore[arg-type]
                    strides=tuple(attrs.get("strides", (1, 1))),  # type: ignore[arg-type]
                    dilations=tuple(attrs.get("dilations", (1, 1))),  # type: ignore[arg-type]
                    group=int(attrs.get("group", 1)),  # type: ignore[call-overload]
                )
            )
        elif node.op_type == "Resize":
            scales_name = node.input[2] if len(node.input) > 2 else ""
            scales = consts.get(scales_name) if scales_name else None
            resizes.append(
                ResizeSpec(
                    mode=str(attrs.get("mode", "nearest")),
                    coordinate_transformation_mode=str(
                        attrs.get("coordinate_transformation_mode", "half_pixel")
                    ),
                    scales=None if scales is None or scales.size == 0 else tuple(float(s) for s in scales),
                )
            )
    input_shape = _dims(inputs[0])
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxGraphInfo(
        opset=int(opset),
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        input_name=inputs[0].name,
        input_shape=input_shape,
        output_names=tuple(o.name for o in graph.output),
        output_shape=_dims(graph.output[-1]),
        fixed_batch=input_shape[0] if input_shape else None,
        n_initializer_elements=int(sum(int(np.prod(t.dims)) for t in graph.initializer)),
        convs=tuple(convs),
        resizes=tuple(resizes),
        ops=tuple(n.op_type for n in graph.node if n.op_type not in _IGNORED_OPS),
    )


def _expected_ptychonn2_ops(n_levels: int) -> tuple[str, ...]:
    down = ("Conv", "Relu", "Conv", "Relu", "MaxPool")
    up = ("Conv", "Relu", "Conv", "Relu", "Resize")
    return down * n_levels + up * n_levels + ("Conv", "Tanh", "Mul")


def _check_resizes(info: OnnxGraphInfo, model: nn.Module) -> None:
    from torch import nn

    upsamples = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    if len(upsamples) != len(info.resizes):
        raise InvalidModelError(
            f"the graph has {len(info.resizes)} Resize nodes but the model {len(upsamples)} Upsample layers"
        )
    for i, (spec, up) in enumerate(zip(info.resizes, upsamples, strict=True)):
        torch_mode = "linear" if up.mode in ("bilinear", "linear") else up.mode
        coordinate_ok = (spec.coordinate_transformation_mode in _ALIGN_CORNERS_FALSE) != bool(up.align_corners)
        if spec.mode != torch_mode or not coordinate_ok:
            raise InvalidModelError(
                f"Resize #{i} is mode={spec.mode!r}, coordinate_transformation_mode="
                f"{spec.coordinate_transformation_mode!r}, but the model upsamples with mode={up.mode!r}, "
                f"align_corners={up.align_corners!r}"
            )
        if spec.scales is not None and tuple(spec.scales[-2:]) != (float(up.scale_factor),) * 2:
            raise InvalidModelError(
                f"Resize #{i} scales {spec.scales} differ from the model's scale_factor {up.scale_factor}"
            )


def load_onnx_weights(model: nn.Module, onnx_model: str | Path | onnx.ModelProto) -> nn.Module:
    """Copy the convolution weights of an ONNX graph into a torch network, in place.

    The ``Conv`` nodes are matched to the network's ``nn.Conv2d`` layers by order (graph order
    vs. module registration order, which is the forward order for the PtychoNN classes), and
    every weight/bias shape and conv attribute is checked, as are the ``Resize`` modes against
    the network's ``nn.Upsample`` layers.  Initializer names are not relied on, so graphs
    exported under other names load too.

    Parameters
    ----------
    model : torch.nn.Module
        A network with the same convolution sequence (e.g. ``PtychoNN2()`` for the paper's file).
    onnx_model : str, Path or onnx.ModelProto
        The ONNX file or loaded model.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, with the weights loaded, in eval mode.

    Raises
    ------
    InvalidModelError
        If the graph's convolutions or upsampling do not fit the network.
    """
    import torch
    from torch import nn

    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else read_onnx(onnx_model)
    info = onnx_graph_info(proto)
    inits = _initializers(proto)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(info.convs):
        raise InvalidModelError(
            f"the graph has {len(info.convs)} Conv nodes but the model has {len(convs)} Conv2d layers"
        )
    _check_resizes(info, model)
    with torch.no_grad():
        for i, (spec, conv) in enumerate(zip(info.convs, convs, strict=True)):
            attrs_ok = (
                spec.kernel_shape == tuple(conv.kernel_size)
                and spec.strides == tuple(conv.stride)
                and spec.dilations == tuple(conv.dilation)
                and spec.group == conv.groups
                and spec.pads == tuple(conv.padding) * 2  # type: ignore[operator]
            )
            if spec.weight_shape != tuple(conv.weight.shape) or not attrs_ok:
                raise InvalidModelError(
                    f"Conv #{i} ({spec.weight_name}): weight {spec.weight_shape}, kernel {spec.kernel_shape}, "
                    f"pads {spec.pads}, strides {spec.strides} do not fit {conv}"
                )
            conv.weight.copy_(torch.from_numpy(numpy_helper.to_array(inits[spec.weight_name]).copy()))
            if (spec.bias_name is None) != (conv.bias is None):
                raise InvalidModelError(f"Conv #{i} ({spec.weight_name}): bias presence differs from {conv}")
            if spec.bias_name is not None and conv.bias is not None:
                conv.bias.copy_(torch.from_numpy(numpy_helper.to_array(inits[spec.bias_name]).copy()))
    logger.debug("loaded %d conv layers from ONNX (%s)", len(convs), info.producer)
    return model.eval()


def ptychonn2_from_onnx(onnx_model: str | Path | onnx.ModelProto) -> PtychoNN2:
    """Build a :class:`PtychoNN2` that reproduces an ONNX PtychoNN 2.0 graph.

    The width (``nconv``) is read from the first convolution and the depth from the number of
    ``MaxPool`` nodes; the op sequence must be exactly PtychoNN 2.0's
    (``[Conv Relu Conv Relu MaxPool] x L, [Conv Relu Conv Relu Resize] x L, Conv Tanh Mul``) and
    the final ``Mul`` constant must be pi.

    Parameters
    ----------
    onnx_model : str, Path or onnx.ModelProto
        E.g. the paper's ``ptychoNN_8.onnx`` or a file written by
        :func:`~edge_ptycho_bluesky.model.export.export_onnx`.

    Returns
    -------
    PtychoNN2
        The network with the graph's weights, in eval mode, float32 on the CPU.
    """
    from .ptychonn import PtychoNN2

    proto = onnx_model if isinstance(onnx_model, onnx.ModelProto) else read_onnx(onnx_model)
    info = onnx_graph_info(proto)
    n_levels = info.ops.count("MaxPool")
    if n_levels < 1 or not info.convs:
        raise InvalidModelError("the graph has no MaxPool/Conv nodes: not a PtychoNN 2.0 graph")
    if info.ops != _expected_ptychonn2_ops(n_levels):
        raise InvalidModelError(
            f"the graph's op sequence is not PtychoNN 2.0's with {n_levels} levels: {info.ops}"
        )
    mul = next(n for n in reversed(proto.graph.node) if n.op_type == "Mul")
    consts = _constant_values(proto)
    factor = next((consts[name] for name in mul.input if name in consts), None)
    if factor is None or factor.size != 1 or not np.isclose(float(factor.reshape(())), np.pi, rtol=1e-6):
        raise InvalidModelError(f"the output is scaled by {factor!r}, expected pi (tanh * pi)")
    model = PtychoNN2(nconv=info.convs[0].weight_shape[0], n_levels=n_levels)
    return load_onnx_weights(model, proto)  # type: ignore[return-value]
