"""Channel Access records of the simulated beamline IOC, built on caproto's server channels.

A record here is a caproto channel with an ``on_put`` hook: the hook sees each client write
before it is accepted, may change the value, refuse it (raise :class:`Refused`: the client's
put fails, as an areaDetector record refuses an invalid value), or act on it (start an
acquisition, a move). :class:`RecordSet` builds the records of one device under a prefix,
including areaDetector's setting/readback pairs (``AcquireTime`` + ``AcquireTime_RBV``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from caproto import (
    ChannelChar,
    ChannelData,
    ChannelDouble,
    ChannelEnum,
    ChannelInteger,
    ChannelString,
    ChannelType,
    native_type,
)

__all__ = ["RecordSet", "Refused"]

#: Longest string a text record holds (areaDetector's file paths and NDAttributes XML are
#: char waveforms, not 40-character EPICS strings).
TEXT_LENGTH = 4096

PutHook = Callable[[Any], Awaitable[Any]]


class Refused(ValueError):
    """A write the record does not accept (the client's put fails with this message)."""


def _hooked(base: type[ChannelData]) -> type[ChannelData]:
    class Hooked(base):  # type: ignore[misc, valid-type]
        on_put: PutHook | None = None

        async def verify_value(self, data: Any) -> Any:
            data = await super().verify_value(data)
            if self.on_put is None:
                return data
            out = await self.on_put(data)
            return data if out is None else out

    Hooked.__name__ = f"Hooked{base.__name__}"
    return Hooked


_FLOAT, _INT, _ENUM, _CHARS, _STRING = (_hooked(c) for c in (ChannelDouble, ChannelInteger, ChannelEnum, ChannelChar,
                                                              ChannelString))


class _TEXT(_CHARS):  # type: ignore[misc, valid-type]
    """A char waveform holding a string; writes as char arrays are decoded up to the first NUL
    (caproto cannot convert an empty one, which clients send for "")."""

    async def write_from_dbr(self, data: Any, data_type: Any, metadata: Any, *, flags: int = 0) -> Any:
        if native_type(data_type) == ChannelType.CHAR:
            raw = np.asarray(data, dtype=np.uint8).tobytes().split(b"\0", 1)[0]
            return await self.write(raw.decode(errors="replace"), flags=flags)
        return await super().write_from_dbr(data, data_type, metadata, flags=flags)


class RecordSet:
    """The records of one device: ``records.pvdb`` maps full PV names to channels.

    Parameters
    ----------
    prefix
        Prepended to every record name (``"13SIM1:cam1:"``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pvdb: dict[str, ChannelData] = {}

    def _add(self, name: str, channel: ChannelData, on_put: PutHook | None) -> ChannelData:
        full = self.prefix + name
        if full in self.pvdb:
            raise ValueError(f"record {full} defined twice")
        channel.on_put = on_put  # type: ignore[attr-defined]
        self.pvdb[full] = channel
        return channel

    def double(self, name: str, value: float = 0.0, *, on_put: PutHook | None = None, units: str = "",
               precision: int = 4, **limits: float) -> ChannelData:
        """A float64 record; ``limits`` are caproto's (``lower_ctrl_limit``, ``upper_ctrl_limit``...)."""
        return self._add(name, _FLOAT(value=float(value), units=units, precision=precision, **limits), on_put)

    def long(self, name: str, value: int = 0, *, on_put: PutHook | None = None) -> ChannelData:
        return self._add(name, _INT(value=int(value)), on_put)

    def enum(self, name: str, value: str | None = None, *, choices: Sequence[str],
             on_put: PutHook | None = None) -> ChannelData:
        return self._add(name, _ENUM(value=value or choices[0], enum_strings=list(choices)), on_put)

    def text(self, name: str, value: str = "", *, on_put: PutHook | None = None) -> ChannelData:
        """A long string (a char waveform, like areaDetector's file names)."""
        return self._add(name, _TEXT(value=value, max_length=TEXT_LENGTH), on_put)

    def string(self, name: str, value: str = "", *, on_put: PutHook | None = None) -> ChannelData:
        """An EPICS string (at most 40 characters, like a motor record's ``EGU``)."""
        return self._add(name, _STRING(value=value), on_put)

    def setting(self, kind: str, name: str, value: Any, *, check: PutHook | None = None,
                **kwargs: Any) -> tuple[ChannelData, ChannelData]:
        """An areaDetector setting of ``kind`` (``"double"``, ``"long"``, ``"enum"``, ``"text"``):
        ``name`` (written by clients) and ``name_RBV`` (what the driver applied). ``check`` may refuse or adjust a written value; the readback follows."""
        readback = getattr(self, kind)(name + "_RBV", value, **kwargs)

        async def apply(data: Any) -> Any:
            if check is not None:
                out = await check(data)
                data = data if out is None else out
            await readback.write(data, verify_value=False)
            return data

        return getattr(self, kind)(name, value, on_put=apply, **kwargs), readback
