"""Shared fixtures: a real RunEngine, a real embedded Tiled catalog, the simulated beamline."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path

import pytest

# Nothing in the tests may leave loopback (pvAccess clients and servers).
for _name, _value in {"EPICS_PVA_ADDR_LIST": "127.0.0.1", "EPICS_PVA_AUTO_ADDR_LIST": "NO",
                      "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1", "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
                      "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1", "MPLBACKEND": "Agg"}.items():
    os.environ[_name] = _value

#: The real reference data beside the project (absent in a fresh clone elsewhere).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """Path of a reference file in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"reference data {path} is absent (../shared/data is only beside the workspace clone)")
    return path


@pytest.fixture
def RE():
    """A fresh RunEngine on its own event loop, halted and closed afterwards."""
    from bluesky import RunEngine

    from bluesky.utils import TransitionError

    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    if engine.state not in ("idle", "panicked"):
        try:
            engine.halt()
        except TransitionError:
            pass
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


class DocCollector(defaultdict):
    """``docs["event"]`` lists every event document; ``docs.cb`` is the callback to subscribe."""

    def __init__(self) -> None:
        super().__init__(list)

    def cb(self, name: str, doc: dict) -> None:
        self[name].append(doc)


@pytest.fixture
def docs() -> DocCollector:
    return DocCollector()


@pytest.fixture(scope="session")
def storage_config(tmp_path_factory):
    """One embedded catalog for the session (starting one costs ~5 s)."""
    from edge_ptycho_bluesky.storage import StorageConfig

    return StorageConfig(data_dir=tmp_path_factory.mktemp("tiled"))


@pytest.fixture(scope="session")
def tiled_client(storage_config):
    from edge_ptycho_bluesky.storage import connect

    return connect(storage_config)


@pytest.fixture
def beamline(storage_config):
    """The simulated beamline (training sample) writing frames where the catalog reads them."""
    from edge_ptycho_bluesky.devices import make_simulated_beamline

    return make_simulated_beamline(storage_config.frames_dir, sample="train", extent_um=1.0, seed=1)


def tiny_onnx(path: Path, scale: float) -> Path:
    """A real dynamic-batch ONNX model ``(N, 1, 128, 128) -> scale * input`` (for transport tests)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, 128, 128])
    y = helper.make_tensor_value_info("phase", TensorProto.FLOAT, ["N", 1, 128, 128])
    k = numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")
    graph = helper.make_graph([helper.make_node("Mul", ["frames", "scale"], ["phase"])], "tiny", [x], [y],
                              initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def wait_until(predicate, timeout: float = 10.0, period: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` s have passed; its last value."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


@pytest.fixture(scope="module")
def two_torch_threads():
    """torch on two intra-op threads for the module (the CI machine's two cores), restored after."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)
