"""PtychoNN networks: PtychoNN 2.0 (phase only) and the original two-headed PtychoNN.

PtychoNN 2.0 is the network of Babu, Zhou et al., Nat. Commun. 14, 7059 (2023), deployed at
the edge in that paper.  Its structure was checked node by node against the paper's trained
ONNX graph (``ptychoNN_8.onnx``, exported from PyTorch 1.11, opset 12):

* encoder: 4 blocks of ``[Conv3x3 + ReLU, Conv3x3 + ReLU, MaxPool 2x2]`` with 16, 32, 64, 128
  filters;
* decoder: 4 blocks of ``[Conv3x3 + ReLU, Conv3x3 + ReLU, bilinear upsample x2]`` whose
  convolutions go 128->128->128, 128->64->64, 64->32->32, 32->16->16 (the first decoder block
  keeps 128 filters);
* head: Conv3x3 16->1, ``tanh``, times pi (float32 ``3.1415927``);
* every convolution is 3x3, stride 1, padding 1, with bias; no batch norm;
* the upsampling is ONNX ``Resize`` with ``mode="linear"`` and
  ``coordinate_transformation_mode="pytorch_half_pixel"``, i.e. ``nn.Upsample(scale_factor=2,
  mode="bilinear", align_corners=False)``.

That is 733,921 trainable parameters.  The figure 733,937 quoted for the paper's file is the
element count of all its ONNX initializers, which also hold the four ``Resize`` scale vectors
``[1, 1, 2, 2]`` (4 x 4 = 16 constants, not parameters).  The module attribute names (``encoder``, ``decoder2`` as
``nn.Sequential`` with the same layer indices) reproduce the paper's PyTorch code, so its
state dicts (``encoder.0.weight`` ... ``decoder2.20.bias``) load unchanged, and so do the
initializer names of its ONNX file.

The original PtychoNN (Cherukara et al., Appl. Phys. Lett. 117, 044103 (2020)) has one encoder
and two decoders: amplitude (``decoder1``, sigmoid) and phase (``decoder2``, tanh times pi).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .. import FRAME_SIZE
from .errors import InvalidModelError

__all__ = [
    "FRAME_SHAPE",
    "MODEL_NAMES",
    "PTYCHONN2_N_PARAMETERS",
    "PTYCHONN2_ONNX_INITIALIZER_ELEMENTS",
    "PtychoNN",
    "PtychoNN2",
    "PtychoNNFast",
    "build_model",
    "count_parameters",
    "load_model",
    "phase_of",
]

logger = logging.getLogger(__name__)

#: Detector frame and phase patch shape the networks are built for, (rows, cols).
FRAME_SHAPE: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)
#: Trainable parameters of PtychoNN 2.0 with its default width (``nconv=16, n_levels=4``).
PTYCHONN2_N_PARAMETERS: int = 733_921
#: Elements of all initializers in the paper's ONNX file: the parameters plus the four
#: ``Resize`` scale vectors ``[1, 1, 2, 2]`` (16 constants).
PTYCHONN2_ONNX_INITIALIZER_ELEMENTS: int = 733_937
#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("ptychonn2", "ptychonn2-fast", "ptychonn")

ModelName = Literal["ptychonn2", "ptychonn2-fast", "ptychonn"]


def _down_block(filters_in: int, filters_out: int) -> list[nn.Module]:
    """Conv3x3 + ReLU, Conv3x3 + ReLU, MaxPool 2x2 (halves rows and columns)."""
    return [
        nn.Conv2d(filters_in, filters_out, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(filters_out, filters_out, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=2),
    ]


def _up_block(filters_in: int, filters_out: int) -> list[nn.Module]:
    """Conv3x3 + ReLU, Conv3x3 + ReLU, bilinear upsample x2 (``align_corners=False``)."""
    return [
        nn.Conv2d(filters_in, filters_out, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Conv2d(filters_out, filters_out, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    ]


def init_weights(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation of every ReLU convolution's weights, small heads.

    PyTorch's default convolution initialisation shrinks the signal about 2x per layer; through
    PtychoNN 2.0's 17 convolutions without normalisation layers that leaves an output that does
    not depend on the input (measured: output spread across different frames ~1e-6 rad, first-
    layer gradients ~1e-5), so L1 training settles on the median phase and never leaves it.
    He initialisation keeps the activations at the scale of the input from layer to layer; the
    last convolution of each head (before ``tanh``/``sigmoid``) starts 10x smaller so the head
    starts in its linear range.  Biases keep PyTorch's default (small, uniform).  Loading
    trained weights replaces all of this.
    """
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    heads = {id(seq[-2]) for seq in model.children()
             if isinstance(seq, nn.Sequential) and isinstance(seq[-1], (nn.Tanh, nn.Sigmoid))}
    for conv in convs:
        nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        if id(conv) in heads:
            conv.weight.data.mul_(0.1)
    return model


def _check_widths(nconv: int, n_levels: int) -> None:
    if isinstance(nconv, bool) or not isinstance(nconv, int) or nconv < 1:
        raise ValueError(f"nconv must be a positive integer (filters of the first level), got {nconv!r}")
    if isinstance(n_levels, bool) or not isinstance(n_levels, int) or n_levels < 1:
        raise ValueError(f"n_levels must be a positive integer (number of pooling levels), got {n_levels!r}")


def _check_input(x: torch.Tensor, n_levels: int) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"input must have shape (N, 1, H, W), got {tuple(x.shape)}; "
            "use edge_ptycho_bluesky.model.preprocess() to prepare frames"
        )
    step = 2**n_levels
    if x.shape[-2] % step or x.shape[-1] % step:
        raise ValueError(
            f"input frames {tuple(x.shape[-2:])} must be divisible by 2**n_levels = {step} "
            "(bin or crop them first)"
        )


class PtychoNN2(nn.Module):
    """PtychoNN 2.0: phase-only encoder-decoder (Babu, Zhou et al. 2023).

    Parameters
    ----------
    nconv : int
        Filters of the first encoder level; level ``i`` has ``nconv * 2**i``.  16 gives the
        paper's network (733,921 parameters).
    n_levels : int
        Pooling levels (encoder blocks = decoder blocks).  4 for 128 x 128 frames.

    Notes
    -----
    ``forward(x)`` maps diffraction intensities ``x : (N, 1, H, W) float32`` to the phase
    ``(N, 1, H, W) float32`` in radians, within ``[-pi, pi]``.  ``H`` and ``W`` must be
    divisible by ``2**n_levels``.
    """

    def __init__(self, nconv: int = 16, n_levels: int = 4) -> None:
        super().__init__()
        _check_widths(nconv, n_levels)
        self.nconv = nconv
        self.n_levels = n_levels
        widths = [nconv * 2**i for i in range(n_levels)]
        encoder: list[nn.Module] = []
        filters_in = 1
        for width in widths:
            encoder += _down_block(filters_in, width)
            filters_in = width
        decoder: list[nn.Module] = []
        for width in reversed(widths):
            decoder += _up_block(filters_in, width)
            filters_in = width
        decoder += [nn.Conv2d(filters_in, 1, kernel_size=3, stride=1, padding=1), nn.Tanh()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder2 = nn.Sequential(*decoder)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Phase in radians, ``(N, 1, H, W)``, from intensities ``x : (N, 1, H, W)``."""
        _check_input(x, self.n_levels)
        return self.decoder2(self.encoder(x)) * math.pi


class PtychoNN(nn.Module):
    """The original two-headed PtychoNN (Cherukara et al. 2020): amplitude and phase.

    Parameters
    ----------
    nconv : int
        Filters of the first encoder level (32 in the original).
    n_levels : int
        Pooling levels (3 in the original, built for 64 x 64 frames; any ``H, W`` divisible
        by ``2**n_levels`` work, so 128 x 128 frames are fine).
    phase_only : bool
        Build only the phase decoder; ``forward`` then returns the phase tensor alone.

    Notes
    -----
    As in the original PyTorch code, the decoder widths mirror the encoder except that they
    never drop below ``2 * nconv`` (for 3 levels: 128, 64, 64), and the heads are
    Conv3x3 -> 1 followed by ``sigmoid`` (amplitude) or ``tanh`` times pi (phase).
    The defaults have 1,247,074 parameters; ``n_levels=4`` (the 128 x 128 variant that the
    2023 paper compares against, quoted there as "4.7M") has 4,787,554.

    ``forward(x)`` with ``x : (N, 1, H, W) float32`` returns ``(amplitude, phase)``, both
    ``(N, 1, H, W) float32``, or only ``phase`` when ``phase_only``.
    """

    def __init__(self, nconv: int = 32, n_levels: int = 3, *, phase_only: bool = False) -> None:
        super().__init__()
        _check_widths(nconv, n_levels)
        self.nconv = nconv
        self.n_levels = n_levels
        self.phase_only = bool(phase_only)
        widths = [nconv * 2**i for i in range(n_levels)]
        encoder: list[nn.Module] = []
        filters_in = 1
        for width in widths:
            encoder += _down_block(filters_in, width)
            filters_in = width
        self.encoder = nn.Sequential(*encoder)
        decoder_widths = [max(w, 2 * nconv) for w in reversed(widths)]
        if not self.phase_only:
            self.decoder1 = nn.Sequential(*self._decoder(widths[-1], decoder_widths), nn.Sigmoid())
        self.decoder2 = nn.Sequential(*self._decoder(widths[-1], decoder_widths), nn.Tanh())
        init_weights(self)

    @staticmethod
    def _decoder(filters_in: int, widths: list[int]) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for width in widths:
            layers += _up_block(filters_in, width)
            filters_in = width
        layers.append(nn.Conv2d(filters_in, 1, kernel_size=3, stride=1, padding=1))
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(amplitude, phase)`` or, when ``phase_only``, ``phase``; each ``(N, 1, H, W)``."""
        _check_input(x, self.n_levels)
        features = self.encoder(x)
        phase = self.decoder2(features) * math.pi
        if self.phase_only:
            return phase
        return self.decoder1(features), phase


class PtychoNNFast(nn.Module):
    """A cheaper PtychoNN 2.0 for CPU edges: binned input, fewer filters, batch norm.

    Same interface as :class:`PtychoNN2` (``(N, 1, 128, 128)`` intensities in, phase in radians
    out), built to keep up with a 2 kHz detector on a few CPU cores:

    * the frame is averaged over ``bin_factor x bin_factor`` blocks first (64 x 64 for 2);
    * an encoder-decoder like PtychoNN 2.0's at that size, with ``nconv`` (8) filters at the
      first level instead of 16, and batch normalisation after every convolution (ONNX Runtime
      folds it into the convolution at inference, so it costs nothing there; in training it
      leaves the median-phase plateau far sooner);
    * ``tanh x pi`` at the binned size, then bilinear upsampling back to the frame size.

    With the defaults it has 184,753 parameters and needs 0.040 GFLOP a frame, 16x fewer than
    PtychoNN 2.0 (0.632).
    """

    def __init__(self, nconv: int = 8, n_levels: int = 4, bin_factor: int = 2, batch_norm: bool = True) -> None:
        super().__init__()
        _check_widths(nconv, n_levels)
        if isinstance(bin_factor, bool) or not isinstance(bin_factor, int) or bin_factor < 1:
            raise ValueError(f"bin_factor must be a positive integer, got {bin_factor!r}")
        self.nconv, self.n_levels, self.bin_factor = nconv, n_levels, bin_factor

        def conv(filters_in: int, filters_out: int) -> list[nn.Module]:
            norm: list[nn.Module] = [nn.BatchNorm2d(filters_out)] if batch_norm else []
            return [nn.Conv2d(filters_in, filters_out, kernel_size=3, padding=1), *norm, nn.ReLU()]

        widths = [nconv * 2**i for i in range(n_levels)]
        encoder: list[nn.Module] = [nn.AvgPool2d(bin_factor)] if bin_factor > 1 else []
        filters_in = 1
        for width in widths:
            encoder += [*conv(filters_in, width), *conv(width, width), nn.MaxPool2d(2)]
            filters_in = width
        decoder: list[nn.Module] = []
        for width in reversed(widths):
            decoder += [*conv(filters_in, width), *conv(width, width),
                        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            filters_in = width
        decoder += [nn.Conv2d(filters_in, 1, kernel_size=3, padding=1), nn.Tanh()]
        self.encoder = nn.Sequential(*encoder)
        self.decoder2 = nn.Sequential(*decoder)
        self.upsample = (nn.Upsample(scale_factor=bin_factor, mode="bilinear", align_corners=False)
                         if bin_factor > 1 else nn.Identity())
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Phase in radians, ``(N, 1, H, W)``, from intensities ``x : (N, 1, H, W)``."""
        _check_input(x, self.n_levels)
        step = self.bin_factor * 2**self.n_levels
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"input frames {tuple(x.shape[-2:])} must be divisible by bin_factor * 2**n_levels = {step}")
        return self.upsample(self.decoder2(self.encoder(x)) * math.pi)


def build_model(name: ModelName | str = "ptychonn2", **kwargs: object) -> nn.Module:
    """Build an untrained network by name.

    Parameters
    ----------
    name : {"ptychonn2", "ptychonn2-fast", "ptychonn"}
        ``"ptychonn2"``: :class:`PtychoNN2` (default; the paper's phase-only network).
        ``"ptychonn2-fast"``: :class:`PtychoNNFast` (binned, narrower, for CPU edges).
        ``"ptychonn"``: the original two-headed :class:`PtychoNN`.
    **kwargs
        Passed to the class (``nconv``, ``n_levels``; ``phase_only`` for ``"ptychonn"``).

    Returns
    -------
    torch.nn.Module
        The network in eval mode, float32, on the CPU.
    """
    key = str(name).lower().replace("-", "").replace("_", "").replace(".", "")
    if key in ("ptychonn2", "ptychonn20"):
        model: nn.Module = PtychoNN2(**kwargs)  # type: ignore[arg-type]
    elif key in ("ptychonn2fast", "ptychonnfast"):
        model = PtychoNNFast(**kwargs)  # type: ignore[arg-type]
    elif key == "ptychonn":
        model = PtychoNN(**kwargs)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown model name {name!r}; choose one of {MODEL_NAMES}")
    return model.eval()


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def phase_of(output: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """The phase tensor of a network's output (the tensor itself, or the last of a tuple)."""
    if isinstance(output, (tuple, list)):
        return output[-1]
    return output


def _unwrap_state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
        if all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()) and obj:
            # Checkpoints saved from nn.DataParallel / DDP prefix every key with "module.".
            return {k.removeprefix("module."): v for k, v in obj.items()}
    raise InvalidModelError(
        f"{path} does not hold a state dict (a mapping of parameter names to tensors); "
        "save weights with torch.save(model.state_dict(), path)"
    )


def load_model(path: str | Path, name: ModelName | str = "ptychonn2", **kwargs: object) -> nn.Module:
    """Build a network and load a state dict saved with ``torch.save(model.state_dict())``.

    The file is read with ``torch.load(..., weights_only=True)``, so pickled code is never
    executed.  A state dict nested under ``"state_dict"``/``"model_state_dict"`` and keys
    prefixed with ``"module."`` (DataParallel) are accepted.

    Parameters
    ----------
    path : str or Path
        The ``.pt``/``.pth`` file.
    name, **kwargs
        As for :func:`build_model`; the architecture must match the saved weights.

    Returns
    -------
    torch.nn.Module
        The network with the weights, in eval mode on the CPU.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    InvalidModelError
        If the file is not a readable state dict or does not match the architecture (a
        ``ValueError`` subclass).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/pickled files
        raise InvalidModelError(f"cannot read weights from {path} (truncated or not a state dict?): {exc}") from exc
    state = _unwrap_state_dict(obj, path)
    model = build_model(name, **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InvalidModelError(f"weights in {path} do not fit model {name!r} {kwargs or ''}: {exc}") from exc
    logger.debug("loaded %s weights from %s", name, path)
    return model.eval()
