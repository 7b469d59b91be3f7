"""A motor-record-compatible axis: the fields that ophyd's ``EpicsMotor`` and ophyd-async's
``Motor`` read and write (``VAL``, ``RBV``, ``DMOV``, ``MOVN``, ``VELO``, ``VMAX``, ``ACCL``,
``EGU``, ``HLM``/``LLM``, ``STOP``...), moving at a finite speed.

A write to ``VAL`` starts a move at ``VELO`` (units per second; acceleration is not modelled)
and completes, for a client that waits (put-callback), when the axis has arrived and ``DMOV``
is 1, as the motor record does. A new ``VAL`` during a move retargets it; ``STOP`` stops it
where it is. Writes outside ``[LLM, HLM]`` are refused. :meth:`MotorAxis.position` gives the
position at any instant (the detector's frames see it), ``RBV`` follows it every ``tick``.
"""

from __future__ import annotations

import asyncio
import math
import time

from .records import RecordSet, Refused

__all__ = ["MotorAxis"]


class MotorAxis:
    """One axis ``PREFIX + name`` (e.g. ``13SIM1:m1``).

    Parameters
    ----------
    prefix, name
        The record is ``prefix + name``; its fields ``prefix + name + ".VAL"`` and so on.
    velocity, max_velocity
        Speed of a move and its upper bound (``VELO``, ``VMAX``), in ``egu`` per second.
    limits
        Soft travel limits (``LLM``, ``HLM``).
    egu, precision
        Engineering units and display precision.
    tick
        Seconds between ``RBV`` updates during a move.
    """

    def __init__(self, prefix: str, name: str, *, velocity: float = 200.0, max_velocity: float = 2000.0,
                 limits: tuple[float, float] = (-50.0, 50.0), egu: str = "um", precision: int = 4,
                 tick: float = 0.005) -> None:
        self.name = prefix + name
        self.tick = float(tick)
        self._p0 = 0.0  # the current move: from _p0 at _t0 towards _target at _speed
        self._t0 = time.monotonic()
        self._target = 0.0
        self._speed = float(velocity)
        self._mover: asyncio.Task[None] | None = None
        self._finishing = False  # the move has arrived and is posting DMOV = 1
        self._done = asyncio.Event()
        self._done.set()
        r = self.records = RecordSet(self.name)
        low, high = limits
        self.val = r.double(".VAL", 0.0, on_put=self._put_val, units=egu, precision=precision)
        self.rbv = r.double(".RBV", 0.0, units=egu, precision=precision)
        r.double(".DRBV", 0.0, units=egu, precision=precision)
        self.dmov = r.long(".DMOV", 1)
        self.movn = r.long(".MOVN", 0)
        self.velo = r.double(".VELO", velocity, on_put=self._put_velocity, units=f"{egu}/s")
        self.vmax = r.double(".VMAX", max_velocity, units=f"{egu}/s")
        r.double(".VBAS", 0.0, units=f"{egu}/s")
        r.double(".ACCL", 0.0, on_put=self._non_negative("ACCL"), units="s")
        r.string(".EGU", egu)
        r.long(".PREC", precision)
        r.double(".MRES", 1e-4, units=egu)
        r.double(".ERES", 1e-4, units=egu)
        r.double(".RRES", 1.0)
        r.long(".SREV", 200)
        r.double(".UREV", 0.02, units=egu)
        r.double(".RDBD", 1e-4, units=egu)
        r.double(".OFF", 0.0, units=egu)
        r.enum(".DIR", choices=["Pos", "Neg"])
        r.enum(".FOFF", choices=["Variable", "Frozen"])
        r.enum(".SET", choices=["Use", "Set"])
        r.enum(".SPMG", "Go", choices=["Stop", "Pause", "Move", "Go"])
        self.hlm = r.double(".HLM", high, on_put=self._put_limit("HLM"), units=egu, precision=precision)
        self.llm = r.double(".LLM", low, on_put=self._put_limit("LLM"), units=egu, precision=precision)
        r.double(".DHLM", high, units=egu, precision=precision)
        r.double(".DLLM", low, units=egu, precision=precision)
        r.long(".HLS", 0)
        r.long(".LLS", 0)
        r.long(".LVIO", 0)
        r.long(".TDIR", 0)
        r.long(".HOMF", 0)
        r.long(".HOMR", 0)
        r.long(".CNEN", 1)
        r.string(".OUT", "simulated")
        r.string(".DESC", f"simulated axis {name}")
        r.long(".STOP", 0, on_put=self._put_stop)

    # -- position --------------------------------------------------------------------------------
    def position(self, t: float | None = None) -> float:
        """Where the axis is at monotonic time ``t`` (now by default)."""
        t = time.monotonic() if t is None else t
        distance = self._target - self._p0
        travelled = self._speed * max(t - self._t0, 0.0)
        if travelled >= abs(distance):
            return self._target
        return self._p0 + math.copysign(travelled, distance)

    @property
    def moving(self) -> bool:
        return not self._done.is_set()

    def _start_segment(self, target: float) -> None:
        now = time.monotonic()
        self._p0, self._t0, self._target = self.position(now), now, float(target)

    # -- record processing -----------------------------------------------------------------------
    async def _put_val(self, value: float) -> float:
        target = float(value)
        low, high = float(self.llm.value), float(self.hlm.value)
        if not math.isfinite(target):
            raise Refused(f"{self.name}: {value!r} is not a position")
        if low < high and not low <= target <= high:
            raise Refused(f"{self.name}: {target} is outside the soft limits [{low}, {high}] "
                          f"(LLM, HLM); the move was not started")
        if self._mover is not None and not self._mover.done() and self._finishing:
            await asyncio.shield(self._mover)  # a client saw DMOV = 1 and moves again: a new move, new DMOV edge
        self._start_segment(target)
        self._done.clear()
        if self._mover is None or self._mover.done():
            self._finishing = False
            self._mover = asyncio.get_running_loop().create_task(self._move())
        await self._done.wait()  # the put completes when the move has ended (DMOV = 1)
        return self._target

    async def _move(self) -> None:
        await self.dmov.write(0)
        await self.movn.write(1)
        try:
            while True:
                position = self.position()
                await self.rbv.write(position)
                if position == self._target:
                    break
                await asyncio.sleep(self.tick)
        finally:
            self._finishing = True
            await self.movn.write(0)
            await self.dmov.write(1)
            self._done.set()

    async def _put_velocity(self, value: float) -> float:
        speed = float(value)
        if not 0 < speed <= float(self.vmax.value):
            raise Refused(f"{self.name}: VELO must be in (0, VMAX={self.vmax.value}], got {value!r}")
        self._start_segment(self._target)
        self._speed = speed
        return speed

    async def _put_stop(self, value: int) -> int:
        if value:
            self._start_segment(self.position())  # stop where it is: the target becomes here
            await self.val.write(self._target, verify_value=False)  # the motor record sets VAL = RBV
        return 0

    def _put_limit(self, field: str):
        async def check(value: float) -> float:
            if not math.isfinite(float(value)):
                raise Refused(f"{self.name}.{field} must be a finite number, got {value!r}")
            return float(value)
        return check

    @staticmethod
    def _non_negative(field: str):
        async def check(value: float) -> float:
            if not float(value) >= 0:
                raise Refused(f"{field} must be >= 0, got {value!r}")
            return float(value)
        return check
