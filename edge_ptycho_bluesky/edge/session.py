"""Where the edge pieces of an interactive Bluesky session connect: :class:`EdgeSessionConfig`.

The session itself (worker, forwarding, live stitch, live plot) is
:func:`edge_ptycho_bluesky.callbacks.session.start_edge_session`, which
``profile_collection/startup/40-edge.py`` calls with :meth:`EdgeSessionConfig.from_env`.

Environment variables (all optional):

``EDGE_PTYCHO_EDGE``
    ``0``/``off``/``no``/``false`` disables edge inference in the session.
``EDGE_PTYCHO_EDGE_WORKER``
    ``embedded`` (default): start ``edge-ptycho worker --registry DIR`` as a child process on
    loopback (:class:`~edge_ptycho_bluesky.edge.process.WorkerProcess`), restart it if it dies
    (``edge.worker.restarts``; frames it missed are listed per run and ``edge.replay(uid)``
    re-infers them) and stop it at exit.  ``external``: use a worker already
    running (started with ``edge-ptycho worker --registry DIR``) on the same channel names; it
    reads the detector's own channel (``EDGE_PTYCHO_EDGE_INPUT``), which the session then does not
    serve (nor forward frames to; ``edge.replay`` needs the embedded worker).
``EDGE_PTYCHO_REGISTRY``
    Model registry folder (default ``<data dir>/registry``); its deployed version is used and
    hot-swapped.  Without a deployed model the embedded worker is not started and one log line
    says how to import one (``edge-ptycho import-onnx FILE.onnx --registry DIR``).
``EDGE_PTYCHO_EDGE_INPUT``, ``EDGE_PTYCHO_EDGE_OUTPUT``, ``EDGE_PTYCHO_EDGE_STATUS``
    Channel names (defaults ``ptycho:det:frames``, ``ptycho:edge:phase``,
    ``ptycho:edge:status``).
``EDGE_PTYCHO_EDGE_ENGINE``
    Engine of the embedded worker (default ``auto``).
``EDGE_PTYCHO_EDGE_REFINE``
    ``1`` (default): run the live refiner (streaming, AI-seeded rPIE in its own process,
    :mod:`edge_ptycho_bluesky.edge.refine_process`) beside the worker; it serves the refined image
    on ``EDGE_PTYCHO_EDGE_IMAGE`` (default ``ptycho:edge:image``), the live plot shows it beside
    the AI mosaic, and the derived run stores it. ``0``: AI only.
``EDGE_PTYCHO_EDGE_REFINE_SECONDS``
    The refiner's budget after each scan's last frame (default 20).
``EDGE_PTYCHO_EDGE_REFINE_PROBE_AFTER``
    Let the refiner refine the probe once this many frames of a scan have arrived (default: the
    probe stays as given). For measured data, whose recorded probe is seldom exact: on the measured
    Siemens star, refining it from the 258th of 516 frames took the refined image from SSIM 0.07 to
    0.67 against offline rPIE (docs/benchmarks.md).
``EDGE_PTYCHO_EDGE_DETECTOR``
    The pvAccess channel of a detector's own PVA plugin (e.g. ``13SIM1:Pva1:Image``): its frames
    are inferred live as they are taken. The session relays each frame that falls within a run
    to the worker's input with the run's uid, its index in the run and its position, read from
    the frame's NDAttributes (:class:`~edge_ptycho_bluesky.callbacks.detector_relay.DetectorRelay`);
    step scans' frames are then not forwarded from the documents (``edge.replay`` still is).
``EDGE_PTYCHO_EDGE_POSITION_ATTRIBUTES``
    The NDAttributes holding a frame's x and y (default ``SampleX,SampleY``, what the simulated
    IOC's NDAttributes give); ``EDGE_PTYCHO_EDGE_POSITION_SCALE`` multiplies them into the scan's
    position units (default 1).
``EDGE_PTYCHO_EDGE_PATH_MAP``
    Where this machine reads a detector's files when the IOC writes them under another path:
    ``IOC_PREFIX=LOCAL_PREFIX`` pairs separated by ``;`` (e.g. ``/data/ioc=/mnt/beamline``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .transport import DEFAULT_INPUT_PV, DEFAULT_OUTPUT_PV, DEFAULT_STATUS_PV

__all__ = ["EdgeSessionConfig", "parse_path_map", "switched_off"]

ENV_ENABLE = "EDGE_PTYCHO_EDGE"
ENV_WORKER = "EDGE_PTYCHO_EDGE_WORKER"
ENV_REGISTRY = "EDGE_PTYCHO_REGISTRY"
ENV_INPUT = "EDGE_PTYCHO_EDGE_INPUT"
ENV_OUTPUT = "EDGE_PTYCHO_EDGE_OUTPUT"
ENV_STATUS = "EDGE_PTYCHO_EDGE_STATUS"
ENV_ENGINE = "EDGE_PTYCHO_EDGE_ENGINE"
ENV_REFINE = "EDGE_PTYCHO_EDGE_REFINE"
ENV_REFINE_SECONDS = "EDGE_PTYCHO_EDGE_REFINE_SECONDS"
ENV_IMAGE = "EDGE_PTYCHO_EDGE_IMAGE"
ENV_PATH_MAP = "EDGE_PTYCHO_EDGE_PATH_MAP"
ENV_REFINE_PROBE_AFTER = "EDGE_PTYCHO_EDGE_REFINE_PROBE_AFTER"
ENV_DETECTOR = "EDGE_PTYCHO_EDGE_DETECTOR"
ENV_POSITION_ATTRIBUTES = "EDGE_PTYCHO_EDGE_POSITION_ATTRIBUTES"
ENV_POSITION_SCALE = "EDGE_PTYCHO_EDGE_POSITION_SCALE"
#: NDAttributes with a frame's position, by default (the simulated IOC's).
DEFAULT_POSITION_ATTRIBUTES = ("SampleX", "SampleY")
#: Channel of the live refined image.
DEFAULT_IMAGE_PV = "ptycho:edge:image"

_OFF = {"0", "off", "no", "false", "disable", "disabled"}


def switched_off(value: str | None) -> bool:
    """True for the values that turn a feature off (``0``, ``off``, ``no``, ``false``...)."""
    return value is not None and value.strip().lower() in _OFF


def parse_path_map(text: str) -> tuple[tuple[str, str], ...]:
    """``"/data/ioc=/mnt/beamline;/other=/x"`` -> ``(("/data/ioc", "/mnt/beamline"), ("/other", "/x"))``."""
    pairs = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        remote, sep, local = item.partition("=")
        if not sep or not remote.strip() or not local.strip():
            raise ValueError(f"{ENV_PATH_MAP}: {item!r} is not IOC_PREFIX=LOCAL_PREFIX (pairs separated by ';')")
        pairs.append((remote.strip(), local.strip()))
    return tuple(pairs)


@dataclass(frozen=True)
class EdgeSessionConfig:
    """Where the edge pieces of a session connect.

    Attributes
    ----------
    enabled : bool
    worker : {"embedded", "external"}
    registry : Path
        Model registry folder of the embedded worker.
    input_pv, output_pv, status_pv : str
        Channel names.
    engine : str
        Engine of the embedded worker.
    worker_args : tuple of str
        More ``edge-ptycho worker`` options for the embedded worker, e.g.
        ``("--threads", "2", "--batch-size", "16")``.
    refine : bool
        Run the live refiner.
    refine_seconds : float
        Its budget after each scan.
    image_pv : str
        Channel of the refined image.
    refine_probe_after : int or None
        Frames after which the refiner refines the probe (None: never).
    path_map : tuple of (str, str)
        ``(IOC prefix, local prefix)`` pairs for the frame files (the frame forwarder's ``path_map``).
    detector_pv : str or None
        A detector's own NTNDArray channel whose frames are relayed live (None: frames are
        forwarded from the documents).
    position_attributes : (str, str)
        The NDAttributes of its frames' x and y.
    position_scale : float
        Multiplies them into the scan's position units.
    """

    enabled: bool = True
    worker: str = "embedded"
    registry: Path = Path("registry")
    input_pv: str = DEFAULT_INPUT_PV
    output_pv: str = DEFAULT_OUTPUT_PV
    status_pv: str = DEFAULT_STATUS_PV
    engine: str = "auto"
    worker_args: tuple[str, ...] = ()
    refine: bool = True
    refine_seconds: float = 20.0
    image_pv: str = DEFAULT_IMAGE_PV
    refine_probe_after: int | None = None
    path_map: tuple[tuple[str, str], ...] = ()
    detector_pv: str | None = None
    position_attributes: tuple[str, str] = DEFAULT_POSITION_ATTRIBUTES
    position_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.position_attributes) != 2 or not all(self.position_attributes):
            raise ValueError(f"{ENV_POSITION_ATTRIBUTES}={','.join(self.position_attributes)!r}: give two names, X,Y")
        if not (isinstance(self.position_scale, (int, float)) and self.position_scale != 0
                and abs(self.position_scale) < float("inf")):
            raise ValueError(f"{ENV_POSITION_SCALE}={self.position_scale!r}: give a finite, non-zero factor")
        if self.worker not in ("embedded", "external"):
            raise ValueError(f"{ENV_WORKER}={self.worker!r}: use 'embedded' or 'external'")
        if not (isinstance(self.refine_seconds, (int, float)) and 0 <= self.refine_seconds < 3600):
            raise ValueError(f"{ENV_REFINE_SECONDS}={self.refine_seconds!r}: give seconds in [0, 3600)")

    @classmethod
    def from_env(cls, data_dir: str | Path) -> EdgeSessionConfig:
        """Read the ``EDGE_PTYCHO_EDGE*`` / ``EDGE_PTYCHO_REGISTRY`` variables (module docstring)."""
        env = os.environ
        registry = env.get(ENV_REGISTRY) or str(Path(data_dir) / "registry")
        try:
            refine_seconds = float(env.get(ENV_REFINE_SECONDS) or 20.0)
        except ValueError as exc:
            raise ValueError(f"{ENV_REFINE_SECONDS}={env.get(ENV_REFINE_SECONDS)!r} is not a number of seconds") from exc
        probe_after = env.get(ENV_REFINE_PROBE_AFTER)
        if probe_after and not probe_after.strip().isdigit():
            raise ValueError(f"{ENV_REFINE_PROBE_AFTER}={probe_after!r} is not a number of frames")
        try:
            position_scale = float(env.get(ENV_POSITION_SCALE) or 1.0)
        except ValueError as exc:
            raise ValueError(f"{ENV_POSITION_SCALE}={env.get(ENV_POSITION_SCALE)!r} is not a number") from exc
        attributes = env.get(ENV_POSITION_ATTRIBUTES)
        return cls(enabled=not switched_off(env.get(ENV_ENABLE)),
                   worker=env.get(ENV_WORKER, "embedded").strip().lower() or "embedded",
                   registry=Path(registry).expanduser(),
                   input_pv=env.get(ENV_INPUT) or DEFAULT_INPUT_PV,
                   output_pv=env.get(ENV_OUTPUT) or DEFAULT_OUTPUT_PV,
                   status_pv=env.get(ENV_STATUS) or DEFAULT_STATUS_PV,
                   engine=env.get(ENV_ENGINE) or "auto",
                   refine=not switched_off(env.get(ENV_REFINE)),
                   refine_seconds=refine_seconds,
                   image_pv=env.get(ENV_IMAGE) or DEFAULT_IMAGE_PV,
                   refine_probe_after=int(probe_after) if probe_after else None,
                   path_map=parse_path_map(env.get(ENV_PATH_MAP) or ""),
                   detector_pv=(env.get(ENV_DETECTOR) or "").strip() or None,
                   position_attributes=(tuple(n.strip() for n in attributes.split(","))  # type: ignore[arg-type]
                                        if attributes else DEFAULT_POSITION_ATTRIBUTES),
                   position_scale=position_scale)
