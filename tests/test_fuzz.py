"""Fuzzing (hypothesis) of everything that reads outside input: the pvAccess frame decoder, the
CXI reader, the scan plan's arguments and the model registry's manifests.

Each property is "returns a sane result, or raises the documented error": FrameDecodeError for
frames, ValueError/FileNotFoundError for CXI files, TypeError/ValueError for plan arguments,
RegistryError for manifests.  Anything else (a crash, a KeyError, an AttributeError...) fails.
"""

from __future__ import annotations

import json
import math
import os

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

#: Examples per property: 60 in CI; e.g. EDGE_PTYCHO_FUZZ_EXAMPLES=2000 for a longer local pass.
FUZZ = settings(max_examples=int(os.environ.get("EDGE_PTYCHO_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- the frame decoder ------------------------------------------------------------------------

pva = pytest.importorskip("pvaccess")

from edge_ptycho_bluesky.edge.ntnda import FrameDecodeError, decode_frame, encode_frame  # noqa: E402

_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64"]
_VALUE_FIELDS = ["byteValue", "ubyteValue", "shortValue", "ushortValue", "intValue", "uintValue", "longValue",
                 "ulongValue", "floatValue", "doubleValue"]
_REASONS = {"empty", "bad_shape", "bad_dtype", "compressed"}


@FUZZ
@given(data=arrays(st.sampled_from(_DTYPES), st.tuples(st.integers(1, 40), st.integers(1, 40))),
       unique_id=st.integers(0, 2**31 - 1),
       pos=st.none() | st.tuples(st.floats(allow_nan=True, allow_infinity=True),
                                 st.floats(allow_nan=True, allow_infinity=True)),
       scan_uid=st.none() | st.text(max_size=40))
def test_any_encoded_frame_decodes_back_exactly(data, unique_id, pos, scan_uid):
    try:
        pv = encode_frame(data, unique_id, pos=pos, scan_uid=scan_uid)
    except (TypeError, ValueError):
        return  # documented refusals of the encoder
    try:
        frame = decode_frame(pv)
    except FrameDecodeError as exc:
        assert exc.reason in _REASONS
        return
    assert frame.unique_id == unique_id
    assert frame.data.shape == data.shape
    np.testing.assert_array_equal(frame.data, data.astype(frame.data.dtype))
    if pos is None or not all(math.isfinite(v) for v in pos):
        assert frame.pos is None
    else:
        assert frame.pos == pytest.approx(pos)


@FUZZ
@given(dims=st.lists(st.integers(0, 70), max_size=4), n=st.integers(0, 300), field=st.sampled_from(_VALUE_FIELDS),
       codec=st.sampled_from(["", "", "lz4", "jpeg", "\x00"]), unique_id=st.integers(-(2**31), 2**31 - 1))
def test_malformed_ntndarrays_raise_only_frame_decode_errors(dims, n, field, codec, unique_id):
    nt = pva.NtNdArray()
    nt["uniqueId"] = unique_id
    nt["dimension"] = [pva.PvDimension(d, 0, d, 1, False) for d in dims]
    dtype = {"byteValue": np.int8, "ubyteValue": np.uint8, "shortValue": np.int16, "ushortValue": np.uint16,
             "intValue": np.int32, "uintValue": np.uint32, "longValue": np.int64, "ulongValue": np.uint64,
             "floatValue": np.float32, "doubleValue": np.float64}[field]
    nt["value"] = {field: np.arange(n).astype(dtype)}
    if codec:
        nt["codec"] = pva.PvCodec(codec, pva.PvInt(int(pva.USHORT)))
    try:
        frame = decode_frame(nt)
    except FrameDecodeError as exc:
        assert exc.reason in _REASONS
        return
    assert len(dims) == 2 and frame.data.size == n == dims[0] * dims[1] and not codec.strip("\x00")


# -- the CXI reader ---------------------------------------------------------------------------

from edge_ptycho_bluesky.io.cxi import read_cxi  # noqa: E402

_CXI_ERRORS = (ValueError, FileNotFoundError)


@FUZZ
@given(blob=st.binary(max_size=4096))
def test_random_bytes_are_not_a_cxi_file(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("cxi") / "random.cxi"
    path.write_bytes(blob)
    with pytest.raises(_CXI_ERRORS):
        read_cxi(path)


@FUZZ
@given(data=st.data())
def test_hdf5_files_with_odd_layouts_give_clear_errors(tmp_path_factory, data):
    """Real HDF5 files with the CXI dataset names but arbitrary shapes, dtypes and values."""
    path = tmp_path_factory.mktemp("cxi") / "odd.cxi"
    names = ["/entry_1/data_1/data", "/entry_1/data_1/translation", "/entry_1/instrument_1/detector_1/x_pixel_size",
             "/entry_1/instrument_1/detector_1/y_pixel_size", "/entry_1/instrument_1/detector_1/distance",
             "/entry_1/instrument_1/source_1/energy", "/entry_1/instrument_1/source_1/probe"]
    with h5py.File(path, "w") as f:
        for name in data.draw(st.lists(st.sampled_from(names), unique=True)):
            shape = data.draw(st.lists(st.integers(0, 6), max_size=3).map(tuple))
            kind = data.draw(st.sampled_from(["f8", "i4", "u2", "S4"]))
            value = data.draw(arrays(kind, shape)) if kind != "S4" else np.zeros(shape, "S4")
            f.create_dataset(name, data=value)
    try:
        scan = read_cxi(path)
    except _CXI_ERRORS as exc:
        assert str(exc)
        return
    assert scan.frames.ndim == 3 and len(scan.positions_m) == len(scan.frames)


def test_a_truncated_cxi_file_gives_a_clear_error(tmp_path):
    from edge_ptycho_bluesky.io.cxi import PtychoScan, write_cxi
    from edge_ptycho_bluesky.sim import Geometry

    geometry = Geometry()
    scan = PtychoScan(frames=np.ones((4, geometry.frame_size, geometry.frame_size), np.float32),
                      positions_m=np.zeros((4, 2)), geometry=geometry)
    path = write_cxi(tmp_path / "whole.cxi", scan)
    assert len(read_cxi(path).frames) == 4
    cut = tmp_path / "cut.cxi"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="not an HDF5/CXI file|not a usable CXI"):
        read_cxi(cut)


# -- the scan plan's arguments ----------------------------------------------------------------

from edge_ptycho_bluesky.plans import spiral_ptycho_scan  # noqa: E402

_ANY = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=5)
        | st.just([]) | st.just("nm"))


@FUZZ
@given(step=_ANY | st.floats(-1, 1), num_points=_ANY | st.integers(-5, 5), x_center=_ANY, y_center=_ANY,
       exposure=st.none() | st.floats() | st.integers(-5, 5))
def test_plan_arguments_are_checked_before_anything_moves(beamline, step, num_points, x_center, y_center,
                                                          exposure):
    """Building the plan and taking its first message never touches hardware; bad values raise
    TypeError/ValueError with a message, good ones produce messages."""
    try:
        plan = spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=step,
                                  num_points=num_points, x_center=x_center, y_center=y_center, exposure=exposure)
        first = next(iter(plan))
    except (TypeError, ValueError) as exc:
        assert str(exc)
        return
    assert first.command
    assert isinstance(num_points, int) and num_points >= 1 and 0 < step


# -- registry manifests -----------------------------------------------------------------------

from edge_ptycho_bluesky.training.registry import ModelRegistry  # noqa: E402
from edge_ptycho_bluesky.training.registry_checks import RegistryError  # noqa: E402

from .conftest import tiny_onnx  # noqa: E402

_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzreg")
    registry = ModelRegistry(root / "registry")
    mv = registry.publish({"model.onnx": tiny_onnx(root / "m.onnx", 2.0)}, model="tiny")
    return registry, mv.version, json.loads((mv.path / "manifest.json").read_text())


@FUZZ
@given(data=st.data())
def test_mangled_manifests_are_refused_with_registry_errors(published, data):
    registry, version, good = published
    path = registry.versions_dir / version / "manifest.json"
    mutation = data.draw(st.sampled_from(["replace", "drop_key", "set_key", "bytes"]))
    if mutation == "replace":
        text = json.dumps(data.draw(_JSON))
    elif mutation == "bytes":
        text = data.draw(st.binary(max_size=200)).decode("latin-1")
    else:
        manifest = dict(good)
        key = data.draw(st.sampled_from(sorted(good)))
        if mutation == "drop_key":
            manifest.pop(key)
        else:
            manifest[key] = data.draw(_JSON)
        text = json.dumps(manifest)
    assume(text != json.dumps(good))
    try:
        path.write_text(text, encoding="latin-1")
        try:
            mv = registry.verify(version)
        except RegistryError as exc:
            assert version in str(exc) or "manifest" in str(exc)
        else:  # accepted: the manifest must still describe a loadable, checksummed version
            assert mv.version == version and mv.onnx_path.is_file()
    finally:
        path.write_text(json.dumps(good, indent=2))
    assert registry.verify(version).version == version
