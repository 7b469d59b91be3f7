"""Fermat-spiral ptychography plans, in bluesky's own plan pattern."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp
import numpy as np
from bluesky.plans import list_scan
from numpy.typing import NDArray

from edge_ptycho_bluesky.runs import (META_KEY, POSITION_UNITS_M, EdgePtychoMeta, RunFormatError, geometry_record,
                                     probe_record)
from edge_ptycho_bluesky.sim import (beam_diameter_nm, dose_photons_per_nm2, fermat_spiral, overlap_ratio,
                                     paper_route)

logger = logging.getLogger(__name__)

#: Steps above this (in um) almost certainly mean the caller gave nanometres.
MAX_PLAUSIBLE_STEP_UM = 5.0
#: Scans at or above this overlap are marked ``labelled`` (usable for rPIE labels) by default.
LABELLED_OVERLAP = 0.8


def spiral_ptycho_pattern(x_center: float, y_center: float, step: float, num_points: int,
                          route: str | Path | None = None) -> NDArray[np.float64]:
    """Positions of a Fermat-spiral ptychography scan (pure pattern, no messages).

    Parameters
    ----------
    x_center, y_center
        Spiral centre, in the motors' units.
    step
        Spiral step (``r_n = step * sqrt(n)``), in the motors' units.
    num_points
        Number of points; with ``route`` the first ``num_points`` of the route.
    route
        Optional ``.npz`` route with ``x``, ``y`` in units of the step (the paper's
        ``optimized_route.npz``, 963 points).

    Returns
    -------
    xy : (num_points, 2) float64
    """
    if route is None:
        xy = fermat_spiral(num_points, step)
    else:
        xy = paper_route(step, route)
        if num_points > len(xy):
            raise ValueError(f"num_points={num_points} but the route {route} has only {len(xy)} points")
        xy = xy[:num_points]
    return xy + np.array([x_center, y_center])


def _check_args(detectors: Sequence[Any], step: Any, num_points: Any, x_center: Any, y_center: Any) -> None:
    if not isinstance(detectors, Sequence) or isinstance(detectors, str) or not detectors:
        raise TypeError(f"detectors must be a non-empty list of detectors, got {detectors!r}")
    for name, value in (("step", step), ("x_center", x_center), ("y_center", y_center)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in the motors' units (um), got {value!r}")
        if not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if step <= 0:
        raise ValueError(f"step must be positive (um), got {step!r}; e.g. step=0.05 is the paper's 50 nm")
    if step > MAX_PLAUSIBLE_STEP_UM:
        raise ValueError(
            f"step={step!r} um is implausibly large for a ptychography scan: the step is in the "
            f"motors' units (micrometres); for {step} nm pass step={step / 1000:g}")
    if isinstance(num_points, bool) or not isinstance(num_points, numbers.Integral):
        raise TypeError(f"num_points must be an integer, got {num_points!r}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")


def _check_limits(motor: Any, values: NDArray[np.float64]) -> None:
    limits = getattr(motor, "limits", None)
    if not limits or limits[0] >= limits[1]:
        return
    low, high = limits
    if values.min() < low or values.max() > high:
        raise ValueError(
            f"the scan moves {motor.name} over [{values.min():.4g}, {values.max():.4g}] but its travel "
            f"is [{low:.4g}, {high:.4g}]: reduce step or num_points, or recentre the scan")


def exposure_signal(detector: Any) -> Any:
    """The signal of a detector's exposure time: the simulated detectors' ``exposure_time``, an
    ophyd-async areaDetector's ``driver.acquire_time``, an ophyd areaDetector's ``cam.acquire_time``
    (None when it has none)."""
    for path in (("exposure_time",), ("driver", "acquire_time"), ("cam", "acquire_time")):
        obj = detector
        for part in path:
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    return None


def _beam_diameter_from_probe(meta: dict[str, Any]) -> float | None:
    """The recorded probe's beam diameter (nm), for the overlap when nothing else gives it."""
    try:
        record = EdgePtychoMeta.from_dict(meta)
        probe = record.probe_array()
        return None if probe is None else beam_diameter_nm(probe if probe.ndim == 2 else probe[0],
                                                           record.pixel_size_nm)
    except (RunFormatError, ValueError) as exc:
        logger.warning("no beam diameter from the probe: %s", exc)
        return None


def _ptycho_metadata(detectors: Sequence[Any], step: float, num_points: int, labelled: bool | None,
                     beam_size: float | None, geometry: dict[str, Any] | None = None,
                     probe: dict[str, str] | None = None, motors: tuple[Any, Any] | None = None,
                     position_units: str = "um", exposure_s: float | None = None) -> dict[str, Any]:
    """The run's ptychography record (:class:`~edge_ptycho_bluesky.runs.EdgePtychoMeta`), as written:
    what a detector provides, with the plan's ``geometry`` and ``probe`` (already recorded forms)
    taking precedence; ``exposure_s`` is the exposure read from a detector that reports nothing
    else. Without ``beam_size`` or a detector's beam diameter, the probe's gives the overlap."""
    um = POSITION_UNITS_M[position_units] / 1e-6  # micrometres per motor unit
    meta: dict[str, Any] = {"step_um": float(step) * um, "num_points": int(num_points),
                            "position_units": position_units}
    if motors is not None:
        meta["position_keys"] = [_fields(motors[0])[0], _fields(motors[1])[0]]
    if exposure_s is not None:
        meta["exposure_s"] = float(exposure_s)
    for det in detectors:
        if hasattr(det, "ptycho_metadata"):
            meta.update(det.ptycho_metadata())
            meta["detector"] = det.name
            meta["exposure_s"] = float(det.exposure_time.get())
            break
    if geometry is not None:
        meta["geometry"] = geometry
    if probe is not None:
        meta["probe"] = probe
    if beam_size is not None:
        meta["beam_diameter_nm"] = float(beam_size) * um * 1e3
    elif "beam_diameter_nm" not in meta and probe is not None and geometry is not None:
        diameter = _beam_diameter_from_probe(meta)
        if diameter is not None:
            meta["beam_diameter_nm"] = diameter
    if "beam_diameter_nm" in meta:
        meta["overlap_ratio"] = overlap_ratio(meta["step_um"] * 1e3, meta["beam_diameter_nm"])
    if "photons_per_second" in meta and "exposure_s" in meta:
        photons = meta["photons_per_second"] * meta["exposure_s"]
        meta["photons_per_point"] = photons
        meta["dose_photons_per_nm2"] = dose_photons_per_nm2(photons, meta["step_um"] * 1e3)
    if labelled is None:
        labelled = meta.get("overlap_ratio", 0.0) >= LABELLED_OVERLAP
    meta["labelled"] = bool(labelled)
    return EdgePtychoMeta.from_dict(meta).to_dict()


def _recorded(geometry: Any, probe: Any, position_units: str) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The plan's ``geometry=`` and ``probe=`` arguments in their recorded forms (checked now, with
    ``position_units``, so that a bad argument fails before the scan moves anything)."""
    if position_units not in POSITION_UNITS_M:
        raise ValueError(f"position_units={position_units!r}: use one of {sorted(POSITION_UNITS_M)}")
    return (None if geometry is None else geometry_record(geometry),
            None if probe is None else probe_record(probe))


def merge_md(base: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` updated with ``extra``, nested mappings merged key by key (so that
    ``md={"edge_ptycho": {"labelled": True}}`` adds to the ptychography record instead of replacing it)."""
    out = dict(base)
    for key, value in (extra or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_md(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _pattern_md(plan_name: str, plan_args: dict[str, Any], xy: NDArray[np.float64], x_motor: Any, y_motor: Any,
                pattern_args: dict[str, Any]) -> dict[str, Any]:
    """The start-document metadata both spiral plans share (pattern, extents, motors, hints)."""
    return {
        "plan_name": plan_name,
        "plan_args": plan_args,
        "plan_pattern": "spiral_ptycho_pattern",
        "plan_pattern_module": __name__,
        "plan_pattern_args": pattern_args,
        "extents": [[float(xy[:, 0].min()), float(xy[:, 0].max())],
                    [float(xy[:, 1].min()), float(xy[:, 1].max())]],
        "hints": {"dimensions": [(_fields(x_motor), "primary"), (_fields(y_motor), "primary")]},
        "motors": [x_motor.name, y_motor.name],
        "num_points": int(pattern_args["num_points"]),
    }


def _fields(motor: Any) -> list[str]:
    try:
        return list(motor.hints["fields"])
    except (AttributeError, KeyError, TypeError):
        return [motor.name]


def spiral_ptycho_scan(
    detectors: Sequence[Any],
    x_motor: Any,
    y_motor: Any,
    *,
    step: float,
    num_points: int,
    x_center: float = 0.0,
    y_center: float = 0.0,
    route: str | Path | None = None,
    exposure: float | None = None,
    beam_size: float | None = None,
    labelled: bool | None = None,
    per_step: Any = None,
    geometry: Any = None,
    probe: Any = None,
    position_units: str = "um",
    md: dict[str, Any] | None = None,
):
    """Fermat-spiral ptychography step scan.

    Parameters
    ----------
    detectors
        Detectors to trigger and read at each point (a :class:`~edge_ptycho_bluesky.devices.PtychoDetector`
        contributes the geometry to the metadata).
    x_motor, y_motor
        The stage axes (micrometres for the simulated stage).
    step
        Spiral step in the motors' units: ``step=0.05`` is the paper's 50 nm.
    num_points
        Number of scan points (the paper: 963).
    x_center, y_center
        Spiral centre (motors' units).
    route
        ``.npz`` route in units of the step (the paper's ``optimized_route.npz``) instead of the
        computed spiral.
    exposure
        Detector exposure time (s) set before the scan (default: leave as is).
    beam_size
        Beam diameter in the motors' units, if no detector reports it (for the overlap ratio).
    labelled
        Mark the scan as a source of rPIE training labels (default: overlap >= 0.8).
    per_step
        Hook for the inner loop (see :func:`bluesky.plan_stubs.one_nd_step`).
    geometry
        The diffraction geometry when the detector does not provide it (a real one does not): a
        :class:`~edge_ptycho_bluesky.sim.Geometry` or a mapping of ``energy_kev``,
        ``detector_distance_m``, ``detector_pixel_m`` and ``frame_size``; it takes precedence
        over a detector's.
    probe
        The probe for rPIE and the live refiner: a ``.npy`` file of the complex probe, or a model
        version's folder with its ``probe.npy`` (recorded as the file's path and sha256).
    position_units
        Unit of the motors' positions (and of ``step``, the centre and ``beam_size``): ``"um"``
        (default, the simulated stage), ``"mm"``, ``"nm"`` or ``"m"``; recorded with the data
        keys of the positions, so that everything reading the run converts them.
    md
        Extra metadata, merged key by key into the plan's (``md={"edge_ptycho": {...}}`` adds to
        the ptychography record).

    Notes
    -----
    The start document carries the scan geometry, probe size, exposure, dose and overlap ratio
    as its edge_ptycho record (:class:`~edge_ptycho_bluesky.runs.EdgePtychoMeta`).
    """
    _check_args(detectors, step, num_points, x_center, y_center)
    if exposure is not None and not (isinstance(exposure, numbers.Real) and exposure > 0):
        raise ValueError(f"exposure must be a positive time in seconds, got {exposure!r}")
    xy = spiral_ptycho_pattern(x_center, y_center, step, num_points, route)
    _check_limits(x_motor, xy[:, 0])
    _check_limits(y_motor, xy[:, 1])
    geometry_md, probe_md = _recorded(geometry, probe, position_units)
    pattern_args = {"x_center": x_center, "y_center": y_center, "step": step, "num_points": num_points,
                    "route": None if route is None else str(route)}
    _md = _pattern_md("spiral_ptycho_scan", {
        "detectors": list(map(repr, detectors)), "x_motor": repr(x_motor), "y_motor": repr(y_motor), **pattern_args,
        "exposure": exposure, "beam_size": beam_size, "labelled": labelled, "per_step": repr(per_step)},
        xy, x_motor, y_motor, pattern_args)

    def inner():
        signals = [s for s in map(exposure_signal, detectors) if s is not None]
        if exposure is not None:
            for signal in signals:
                yield from bps.mv(signal, exposure)
        exposure_s = (yield from bps.rd(signals[0])) if signals else None
        _md[META_KEY] = _ptycho_metadata(detectors, step, num_points, labelled, beam_size, geometry_md, probe_md,
                                         (x_motor, y_motor), position_units, exposure_s)
        return (yield from list_scan(detectors, x_motor, list(xy[:, 0]), y_motor, list(xy[:, 1]),
                                     per_step=per_step, md=merge_md(_md, md)))

    return (yield from inner())


def rel_spiral_ptycho_scan(
    detectors: Sequence[Any],
    x_motor: Any,
    y_motor: Any,
    *,
    step: float,
    num_points: int,
    md: dict[str, Any] | None = None,
    **kwargs: Any,
):
    """:func:`spiral_ptycho_scan` centred on the motors' current positions, which are restored after.

    Takes the same keyword arguments as :func:`spiral_ptycho_scan` except ``x_center``/``y_center``.
    """
    if "x_center" in kwargs or "y_center" in kwargs:
        raise TypeError("rel_spiral_ptycho_scan is centred on the current position: drop x_center/y_center")
    _check_args(detectors, step, num_points, 0.0, 0.0)
    xy = spiral_ptycho_pattern(0.0, 0.0, step, num_points, kwargs.get("route"))
    for motor, offsets in ((x_motor, xy[:, 0]), (y_motor, xy[:, 1])):
        position = getattr(motor, "position", None)
        if isinstance(position, numbers.Real):
            _check_limits(motor, offsets + position)
    _md = merge_md({"plan_name": "rel_spiral_ptycho_scan"}, md)

    @bpp.reset_positions_decorator([x_motor, y_motor])
    @bpp.relative_set_decorator([x_motor, y_motor])
    def inner():
        return (yield from spiral_ptycho_scan(detectors, x_motor, y_motor, step=step, num_points=num_points,
                                              md=_md, **kwargs))

    return (yield from inner())


def spiral_ptycho_flyscan(
    detector: Any,
    x_motor: Any,
    y_motor: Any,
    *,
    step: float,
    num_points: int,
    rate: float = 2000.0,
    x_center: float = 0.0,
    y_center: float = 0.0,
    route: str | Path | None = None,
    exposure: float | None = None,
    labelled: bool | None = None,
    flush_period: float = 0.2,
    geometry: Any = None,
    probe: Any = None,
    position_units: str = "um",
    frames_per_point: int = 2,
    position_keys: tuple[str, str] = ("SampleX", "SampleY"),
    md: dict[str, Any] | None = None,
):
    """Fermat-spiral ptychography fly scan: the detector free-runs at ``rate`` while the stage flies.

    Parameters
    ----------
    detector
        A fly-scan detector: the simulated beamline's ``fly_det``
        (:class:`~edge_ptycho_bluesky.devices.FlyingPtychoDetector`), prepared with the trajectory;
        or an ophyd-async detector (``StandardDetector``, e.g. ``adsimdetector.SimDetector``),
        prepared with a ``TriggerInfo`` of ``num_points * frames_per_point`` frames at ``rate``
        while the plan walks the stage along the route, one point every ``frames_per_point``
        frame periods (the positions recorded are those the hardware reports for each frame,
        ``position_keys``). Either is kicked off, completed, and collected every
        ``flush_period`` seconds, so its StreamResource/StreamDatum documents reach Tiled (and
        any subscriber) while it flies.
    x_motor, y_motor
        The stage axes the detector records per frame (their names are the position data keys).
    step, num_points, x_center, y_center, route, labelled, geometry, probe, position_units, md
        As for :func:`spiral_ptycho_scan`.
    rate
        Frame rate in Hz (2000: the paper's 2 kHz).
    exposure
        Exposure per frame (s); default ``1 / rate`` (no dead time).
    frames_per_point, position_keys
        For an ophyd-async detector: frames per route point, and the data keys of each frame's
        measured x/y (the NDAttributes of the stage readbacks, ``SampleX``/``SampleY`` on the
        simulated IOC).

    Notes
    -----
    The frames go over pvAccess the moment they are taken: an edge worker monitoring the
    detector's channel (the record's ``streamed_to``) infers them live; the frame
    forwarder of the step mode leaves such runs alone (it sends them again only on replay).
    """
    _check_args([detector], step, num_points, x_center, y_center)
    for name, value in (("rate", rate), ("flush_period", flush_period)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if exposure is None:
        exposure = 1.0 / rate
    if isinstance(exposure, bool) or not isinstance(exposure, numbers.Real) or not 0 < exposure <= 1.0 / rate:
        raise ValueError(f"exposure must be positive and at most the frame period 1/rate = {1.0 / rate:g} s, "
                         f"got {exposure!r}")
    if _is_ophyd_async_detector(detector):
        return (yield from _ophyd_async_flyscan(
            detector, x_motor, y_motor, step=step, num_points=num_points, rate=rate, x_center=x_center,
            y_center=y_center, route=route, exposure=exposure, labelled=labelled, flush_period=flush_period,
            geometry=geometry, probe=probe, position_units=position_units, frames_per_point=frames_per_point,
            position_keys=position_keys, md=md))
    for method in ("prepare", "kickoff", "complete", "collect_asset_docs"):
        if not callable(getattr(detector, method, None)):
            raise TypeError(f"{getattr(detector, 'name', detector)!r} is not a fly-scan detector (no {method}()); "
                            "use the simulated beamline's fly_det, or spiral_ptycho_scan for step scans")
    xy = spiral_ptycho_pattern(x_center, y_center, step, num_points, route)
    _check_limits(x_motor, xy[:, 0])
    _check_limits(y_motor, xy[:, 1])
    geometry_md, probe_md = _recorded(geometry, probe, position_units)
    pattern_args = {"x_center": x_center, "y_center": y_center, "step": step, "num_points": num_points,
                    "route": None if route is None else str(route)}
    _md = _pattern_md("spiral_ptycho_flyscan", {
        "detector": repr(detector), "x_motor": repr(x_motor), "y_motor": repr(y_motor), **pattern_args,
        "rate": rate, "exposure": exposure, "labelled": labelled}, xy, x_motor, y_motor, pattern_args)

    def acquire():
        yield from bps.kickoff(detector, wait=True)
        yield from bps.collect_while_completing([detector], [detector], flush_period=flush_period,
                                                stream_name="primary")

    def announce_written(exc: Exception):
        """A failed or stopped fly scan: the frames taken before it are in the file; announce them
        (StreamDatum) so that Tiled has every one, then let the exception end the run."""
        try:
            yield from bps.stop(detector)
            yield from bps.collect(detector, name="primary")
        except Exception:
            logger.exception("%s: frames written before %r could not be announced; they are in %s",
                             getattr(detector, "name", detector), exc, getattr(detector, "file_path", "its file"))

    @bpp.stage_decorator([detector])
    def fly():
        uid = yield from bps.open_run(_md)
        yield from bps.mv(detector.scan_uid, uid)
        yield from bps.declare_stream(detector, name="primary", collect=True)
        yield from bpp.contingency_wrapper(acquire(), except_plan=announce_written)
        yield from bps.close_run()
        return uid

    def inner():
        yield from bps.mv(detector.frame_rate, rate, detector.exposure_time, exposure)
        yield from bps.mv(x_motor, xy[0, 0], y_motor, xy[0, 1])
        _md[META_KEY] = _ptycho_metadata([detector], step, num_points, labelled, None, geometry_md, probe_md,
                                         (x_motor, y_motor), position_units)
        _md.update(merge_md(_md, md))
        yield from bps.prepare(detector, {"positions": xy}, wait=True)
        return (yield from fly())

    return (yield from inner())


def _is_ophyd_async_detector(detector: Any) -> bool:
    try:
        from ophyd_async.core import StandardDetector
    except ImportError:
        return False
    return isinstance(detector, StandardDetector)


def _motor_limits(motor: Any):
    """An EPICS motor's soft limits (``LLM``, ``HLM``) as its ``limits``, read in the plan."""
    if getattr(motor, "limits", None) is None and hasattr(motor, "low_limit_travel"):
        low = yield from bps.rd(motor.low_limit_travel)
        high = yield from bps.rd(motor.high_limit_travel)
        return (float(low), float(high))
    return getattr(motor, "limits", None)


def _ophyd_async_flyscan(detector: Any, x_motor: Any, y_motor: Any, *, step: float, num_points: int, rate: float,
                         x_center: float, y_center: float, route: str | Path | None, exposure: float,
                         labelled: bool | None, flush_period: float, geometry: Any, probe: Any, position_units: str,
                         frames_per_point: int, position_keys: tuple[str, str], md: dict[str, Any] | None):
    """The fly scan of an ophyd-async detector: ``prepare(TriggerInfo)``, ``kickoff``, the stage
    walking the route, ``collect_while_completing``; every frame's position is the one the
    hardware recorded with it."""
    from ophyd_async.core import TriggerInfo

    if isinstance(frames_per_point, bool) or not isinstance(frames_per_point, numbers.Integral) or frames_per_point < 1:
        raise ValueError(f"frames_per_point must be an integer >= 1, got {frames_per_point!r}")
    if len(position_keys) != 2 or not all(isinstance(k, str) and k for k in position_keys):
        raise ValueError(f"position_keys must be two data keys (x, y), got {position_keys!r}")
    xy = spiral_ptycho_pattern(x_center, y_center, step, num_points, route)
    for motor, values in ((x_motor, xy[:, 0]), (y_motor, xy[:, 1])):
        limits = yield from _motor_limits(motor)
        if limits and limits[0] < limits[1] and (values.min() < limits[0] or values.max() > limits[1]):
            raise ValueError(f"the scan moves {motor.name} over [{values.min():.4g}, {values.max():.4g}] but its "
                             f"soft limits are [{limits[0]:.4g}, {limits[1]:.4g}]: reduce step or num_points")
    geometry_md, probe_md = _recorded(geometry, probe, position_units)
    period = 1.0 / rate
    frames = num_points * frames_per_point
    pattern_args = {"x_center": x_center, "y_center": y_center, "step": step, "num_points": num_points,
                    "route": None if route is None else str(route)}
    _md = _pattern_md("spiral_ptycho_flyscan", {
        "detector": repr(detector), "x_motor": repr(x_motor), "y_motor": repr(y_motor), **pattern_args,
        "rate": rate, "exposure": exposure, "labelled": labelled, "frames_per_point": frames_per_point},
        xy, x_motor, y_motor, pattern_args)
    setpoints = [getattr(m, "user_setpoint", m) for m in (x_motor, y_motor)]

    def walk():
        """The stage follows the route, one point every frames_per_point frame periods."""
        last_collect = 0
        for i, (x, y) in enumerate(xy):
            yield from bps.abs_set(setpoints[0], float(x), group="walk")
            yield from bps.abs_set(setpoints[1], float(y), group="walk")
            yield from bps.sleep(frames_per_point * period)
            if (i - last_collect) * frames_per_point * period >= flush_period:
                yield from bps.collect(detector, name="primary")
                last_collect = i
        yield from bps.wait(group="walk")

    @bpp.stage_decorator([detector])
    def fly():
        if hasattr(detector, "driver"):  # an areaDetector: the frame period (TriggerInfo sets it only with dead time)
            yield from bps.mv(detector.driver.acquire_period, period)
        yield from bps.prepare(detector, TriggerInfo(number_of_events=frames, livetime=exposure,
                                                     deadtime=max(period - exposure, 0.0)), wait=True)
        uid = yield from bps.open_run(_md)
        yield from bps.declare_stream(detector, name="primary", collect=True)
        yield from bps.kickoff(detector, wait=True)
        yield from walk()
        yield from bps.collect_while_completing([detector], [detector], flush_period=flush_period,
                                                stream_name="primary")
        yield from bps.close_run()
        return uid

    def inner():
        yield from bps.mv(x_motor, xy[0, 0], y_motor, xy[0, 1])
        meta = _ptycho_metadata([detector], step, num_points, labelled, None, geometry_md, probe_md,
                                (x_motor, y_motor), position_units, exposure)
        meta.update(position_keys=list(position_keys), mode="fly", frame_rate_hz=float(rate))
        _md[META_KEY] = EdgePtychoMeta.from_dict(meta).to_dict()
        _md.update(merge_md(_md, md))
        return (yield from fly())

    return (yield from inner())
