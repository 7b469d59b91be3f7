"""pty-chi backend: run pty-chi's rPIE on the project's arrays and return an :class:`RPIEResult`.

pty-chi (AdvancedPhotonSource/pty-chi, ``ptychi``) is optional. Install it without its dependency
chain (``pip install --no-deps ptychi==2.2.0``): a plain install pulls torchvision and a CUDA torch.

torchvision
-----------
pty-chi imports torchvision only for ``torchvision.transforms.GaussianBlur`` (in ``ptychi/utils.py``,
used by an optional probe-support helper the rPIE path here never calls). Where torchvision is not
installed, or fails to import beside the CPU torch (``operator torchvision::nms does not exist``),
:func:`import_ptychi` registers a minimal stand-in module ``torchvision.transforms`` in
``sys.modules`` whose ``GaussianBlur`` is a plain-torch separable Gaussian blur with reflect
padding (torchvision's behaviour for 4-D input). The stand-in is only inserted by this adapter,
only when the real module is unusable, and is marked with ``__edge_ptycho_stub__ = True``.

scikit-learn
------------
pty-chi declares scikit-learn, but uses it only for ``sklearn.cluster.KMeans`` in its compact
(clustered) batch sampler. Where scikit-learn is not installed the adapter registers, the same way,
a ``sklearn.cluster.KMeans`` stand-in built on ``scipy.cluster.vq.kmeans2`` (k-means++). Installing
``scikit-learn`` makes both stand-ins unnecessary for that part.

Conventions mapped
------------------
* Positions: pty-chi takes probe *centres* relative to an origin it places at
  ``round(H / 2) - 0.5`` (its ``SUPPORT`` mode), extracting the window whose top-left corner is
  ``centre + origin - (N - 1) / 2``. Our top-left corners ``T`` therefore map to
  ``centre = T + (N - 1) / 2 - origin`` (per axis; x is the column, y the row).
* Intensities: pty-chi's far-field propagator is the unnormalised FFT, ours the unitary one, so
  its intensities are ``N^2`` times ours for the same probe: the probe goes in divided by ``N`` and
  comes out multiplied by ``N``.
* Data layout: our frames are fftshifted; pty-chi's ``data_options.fft_shift=True`` expects exactly
  that (it shifts them back).
* Options: ``alpha``/``probe_alpha`` -> the object/probe ``alpha`` of Maiden (2017) table 1,
  ``beta``/``probe_beta`` -> the SGD step sizes, ``batching`` sparse/compact/random ->
  ``UNIFORM``/``COMPACT``/``RANDOM``, ``probe_update_start`` -> the probe's optimisation plan.
  pty-chi shifts the probe for sub-pixel positions exactly (``subpixel_bins`` is ignored).
* The global phase is removed afterwards the same way as in :mod:`.rpie`.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from .positions import check_inside, object_shape_for_positions, validate_scan
from .probe_init import initial_probe_from_frames, modelled_probe
from .reconstructor import RPIEReconstructor
from .rpie_options import ProgressCallback, RPIEOptions, RPIEResult

__all__ = ["import_ptychi", "ptychi_available", "ptychi_rpie"]

logger = logging.getLogger(__name__)


class _GaussianBlur(torch.nn.Module):
    """Stand-in for ``torchvision.transforms.GaussianBlur`` (separable, reflect padding)."""

    def __init__(self, kernel_size: int | Sequence[int], sigma: float | Sequence[float] = (0.1, 2.0)) -> None:
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(ks) != 2 or any(k <= 0 or k % 2 == 0 for k in ks):
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size!r}")
        sig = (float(sigma), float(sigma)) if isinstance(sigma, (int, float)) else tuple(float(s) for s in sigma)
        self.kernel_size = ks
        # torchvision draws sigma uniformly from a (min, max) range; a fixed pair is (s, s).
        self.sigma = sig if len(sig) == 2 else (sig[0], sig[0])

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        sigma = float(self.sigma[0]) if self.sigma[0] == self.sigma[1] else float(
            torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        out = img
        shape = img.shape
        x = img.reshape(-1, 1, shape[-2], shape[-1])
        for axis, k in ((-1, self.kernel_size[0]), (-2, self.kernel_size[1])):
            half = k // 2
            t = torch.arange(k, dtype=x.dtype, device=x.device) - half
            w = torch.exp(-0.5 * (t / sigma) ** 2)
            w = w / w.sum()
            if axis == -1:
                x = torch.nn.functional.pad(x, (half, half, 0, 0), mode="reflect")
                x = torch.nn.functional.conv2d(x, w.view(1, 1, 1, k))
            else:
                x = torch.nn.functional.pad(x, (0, 0, half, half), mode="reflect")
                x = torch.nn.functional.conv2d(x, w.view(1, 1, k, 1))
        out = x.reshape(shape)
        return out


def _stub_module(name: str, package: bool) -> types.ModuleType:
    """An empty module with a proper ``__spec__`` (``importlib.util.find_spec`` must accept it)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []  # type: ignore[attr-defined]
    module.__edge_ptycho_stub__ = True  # type: ignore[attr-defined]
    return module


def _install_torchvision_stub() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    pkg = _stub_module("torchvision", True)
    transforms = _stub_module("torchvision.transforms", False)
    transforms.GaussianBlur = _GaussianBlur  # type: ignore[attr-defined]
    pkg.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchvision"] = pkg
    sys.modules["torchvision.transforms"] = transforms
    logger.info("torchvision unavailable: registered a minimal torchvision.transforms.GaussianBlur stand-in "
                "for pty-chi")


class _KMeans:
    """Stand-in for ``sklearn.cluster.KMeans`` (scipy's k-means++), enough for pty-chi's sampler."""

    def __init__(self, n_clusters: int = 8, **_: Any) -> None:
        self.n_clusters = int(n_clusters)
        self.cluster_centers_: np.ndarray | None = None

    def fit(self, x: ArrayLike) -> _KMeans:
        from scipy.cluster.vq import kmeans2

        self.cluster_centers_, self.labels_ = kmeans2(np.asarray(x, dtype=np.float64), self.n_clusters,
                                                      minit="++", seed=0)
        return self

    def predict(self, x: ArrayLike) -> np.ndarray:
        assert self.cluster_centers_ is not None, "call fit() first"
        d = ((np.asarray(x, dtype=np.float64)[:, None, :] - self.cluster_centers_[None]) ** 2).sum(-1)
        return np.argmin(d, axis=1)


def _install_sklearn_stub() -> None:
    pkg = _stub_module("sklearn", True)
    cluster = _stub_module("sklearn.cluster", False)
    cluster.KMeans = _KMeans  # type: ignore[attr-defined]
    pkg.cluster = cluster  # type: ignore[attr-defined]
    sys.modules["sklearn"] = pkg
    sys.modules["sklearn.cluster"] = cluster
    logger.info("scikit-learn unavailable: registered a scipy k-means stand-in for pty-chi's compact batching")


def import_ptychi() -> types.ModuleType:
    """Import ``ptychi`` (and ``ptychi.api``), with the torchvision stand-in where needed.

    Raises
    ------
    ImportError
        pty-chi is not installed (the message says how to install it).
    """
    if importlib.util.find_spec("ptychi") is None:
        raise ImportError("pty-chi is not installed: pip install --no-deps ptychi==2.2.0 "
                          "(plus pandas, pydantic, tqdm, h5py)")
    try:
        importlib.import_module("torchvision.transforms")
    except Exception as exc:  # missing, or a CUDA torchvision beside a CPU torch
        logger.debug("torchvision import failed (%s); using the stand-in", exc)
        _install_torchvision_stub()
    if importlib.util.find_spec("sklearn") is None:
        _install_sklearn_stub()
    importlib.import_module("ptychi.api")
    importlib.import_module("ptychi.api.task")
    return importlib.import_module("ptychi")


def ptychi_available() -> tuple[bool, str]:
    """``(True, version)`` when pty-chi imports, else ``(False, reason)``."""
    try:
        mod = import_ptychi()
    except Exception as exc:  # any import failure is a reason to skip
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(getattr(mod, "__version__", "unknown"))


def ptychi_rpie(
    frames: ArrayLike,
    positions: ArrayLike,
    probe: ArrayLike | None = None,
    object_shape: tuple[int, int] | None = None,
    iterations: int | None = None,
    *,
    options: RPIEOptions | None = None,
    pixel_size_nm: float | None = None,
    initial_object: ArrayLike | None = None,
    callback: ProgressCallback | None = None,
    beam_diameter_px: float | None = None,
    ptychi_batch_size: int = 1,
    **option_changes: Any,
) -> RPIEResult:
    """pty-chi's rPIE on our arrays; same arguments and result as :func:`.rpie.rpie`.

    ``callback`` is called once at the end with ``(iterations, final error)``; the errors are
    pty-chi's per-epoch mean squared amplitude error converted to our normalisation
    (``sum (|Psi| - sqrt(I))^2 / sum I``).

    ``ptychi_batch_size`` (default 1) replaces ``options.batch_size``: pty-chi 2.2's PIE family adds
    the full per-frame updates of a mini-batch without normalising by their overlap, so with
    overlapping frames in one batch (batch 8 at overlap 0.9 here) it diverges; batch 1 is
    Maiden's sequential rPIE and converges. Without ``probe``, the start is
    :func:`~edge_ptycho_bluesky.recon.probe_init.modelled_probe` when ``beam_diameter_px`` is given.
    """
    if isinstance(ptychi_batch_size, bool) or not isinstance(ptychi_batch_size, int) or ptychi_batch_size < 1:
        raise ValueError(f"ptychi_batch_size must be an integer >= 1, got {ptychi_batch_size!r}")
    opts = options if options is not None else RPIEOptions()
    if option_changes:
        opts = opts.with_updates(**option_changes)
    if iterations is not None:
        opts = opts.with_updates(iterations=iterations)
    if opts.iterations < 1:
        raise ValueError("pty-chi needs iterations >= 1")
    frames32, pos = validate_scan(frames, positions)
    n = frames32.shape[-1]
    if object_shape is None:
        object_shape = object_shape_for_positions(pos, n)
    check_inside(pos, object_shape, n)
    if probe is None:
        if beam_diameter_px is not None:
            probe = modelled_probe(frames32, beam_diameter_px)
        else:
            probe = initial_probe_from_frames(frames32)
    probe_arr = np.asarray(probe, dtype=np.complex64)
    if probe_arr.ndim == 2:
        probe_arr = probe_arr[None]
    if probe_arr.shape[0] < opts.probe_modes:
        rec = RPIEReconstructor(object_shape, probe=probe_arr, options=opts.with_updates(device="cpu"))
        probe_arr = rec.probe  # padded with the same extra-mode recipe
    probe_arr = probe_arr[:opts.probe_modes]

    import_ptychi()
    import ptychi.api as api
    from ptychi.api.task import PtychographyTask

    h, w = object_shape
    if initial_object is None:
        obj0 = np.ones((h, w), dtype=np.complex64)
    else:
        obj0 = np.asarray(initial_object, dtype=np.complex64)
        if obj0.shape != (h, w):
            raise ValueError(f"initial_object has shape {obj0.shape}, expected {(h, w)}")
    origin = np.array([round(h / 2) - 0.5, round(w / 2) - 0.5])
    centres = pos + (n - 1) / 2 - origin
    pixel_m = (pixel_size_nm or 1.0) * 1e-9

    o = api.RPIEOptions()
    o.data_options.fft_shift = True
    o.object_options.pixel_size_m = pixel_m
    o.object_options.alpha = float(opts.alpha)
    o.object_options.optimizable = True
    o.object_options.optimizer = api.Optimizers.SGD
    o.object_options.step_size = float(opts.beta)
    o.probe_options.alpha = float(opts.probe_alpha)
    o.probe_options.optimizable = bool(opts.update_probe)
    o.probe_options.optimizer = api.Optimizers.SGD
    o.probe_options.step_size = float(opts.probe_beta)
    o.probe_options.optimization_plan.start = int(opts.probe_update_start)
    o.probe_position_options.optimizable = False
    o.reconstructor_options.num_epochs = int(opts.iterations)
    o.reconstructor_options.batch_size = int(min(ptychi_batch_size, len(pos)))
    o.reconstructor_options.batching_mode = {
        "sparse": api.BatchingModes.UNIFORM, "compact": api.BatchingModes.COMPACT,
        "random": api.BatchingModes.RANDOM}[opts.batching]
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    o.reconstructor_options.default_device = api.Devices.GPU if device.startswith("cuda") else api.Devices.CPU
    o.reconstructor_options.random_seed = int(opts.seed)

    old_device, old_dtype = torch.get_default_device(), torch.get_default_dtype()
    try:
        task = PtychographyTask(
            o,
            diffraction_data=frames32,
            object_data=obj0[None],
            probe_data=(probe_arr / n)[None],
            probe_position_x_px=centres[:, 1],
            probe_position_y_px=centres[:, 0],
        )
        t0 = time.perf_counter()
        task.run()
        elapsed = time.perf_counter() - t0
        obj = task.get_data_to_cpu("object", as_numpy=True)[0].astype(np.complex64)
        probe_out = task.get_data_to_cpu("probe", as_numpy=True)[0].astype(np.complex64) * n
        loss = np.asarray(task.reconstructor.loss_tracker.table["loss"], dtype=np.float64)
    finally:
        torch.set_default_device(old_device)
        torch.set_default_dtype(old_dtype)
    errors = loss * frames32.size / max(float(frames32.sum(dtype=np.float64)), 1e-30)

    # Illumination and global phase, as in our rPIE.
    illum = np.zeros(object_shape, dtype=np.float32)
    corner = np.floor(pos).astype(int)
    power = (np.abs(probe_out) ** 2).sum(0)
    for r, c in corner:  # one slice add per window; only for the mask/phase reference
        illum[r:r + n, c:c + n] += power
    if opts.phase_reference:
        c = np.angle(np.sum(obj * illum))
        obj = (obj * np.exp(-1j * c)).astype(np.complex64)
        probe_out = (probe_out * np.exp(1j * c)).astype(np.complex64)
    if callback is not None and len(errors):
        callback(int(opts.iterations), float(errors[-1]))
    logger.info("pty-chi rPIE: %d frames x %d epochs in %.2f s (%.0f ms/epoch)", len(pos), opts.iterations,
                elapsed, 1e3 * elapsed / opts.iterations)
    return RPIEResult(
        object=obj,
        probe=probe_out[0] if probe_out.shape[0] == 1 else probe_out,
        positions=pos,
        errors=errors,
        pixel_size_nm=pixel_size_nm,
        iterations=int(opts.iterations),
        time_s=elapsed,
        illumination=illum,
        options=opts,
    )
