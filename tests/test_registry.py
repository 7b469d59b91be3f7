"""Tests of the versioned model registry (edge_ptycho_bluesky.training.registry)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
from datetime import timezone
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_ptycho_bluesky.training.model_version import (
    CURRENT_NAME,
    MANIFEST_NAME,
    REQUIRED_MANIFEST_KEYS,
    ModelVersion,
)
from edge_ptycho_bluesky.training.registry import ModelRegistry, import_onnx
from edge_ptycho_bluesky.training.registry_checks import (
    RegistryError,
    check_onnx_contract,
)
from edge_ptycho_bluesky.training.registry_cli import REGISTRY_ENV, add_subcommand

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER_ONNX = SHARED_DATA / "ptychoNN_8.onnx"


def make_onnx(
    scale: float = 2.0,
    *,
    batch: int | str = "N",
    in_shape: tuple[int, ...] = (1, 128, 128),
    out_shape: tuple[int, ...] | None = None,
) -> bytes:
    """A tiny valid ONNX model: phase = scale * frames, input (batch, *in_shape)."""
    out_shape = in_shape if out_shape is None else out_shape
    frames = helper.make_tensor_value_info("frames", TensorProto.FLOAT, [batch, *in_shape])
    phase = helper.make_tensor_value_info("phase", TensorProto.FLOAT, [batch, *out_shape])
    k = numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")
    node = helper.make_node("Mul", ["frames", "scale"], ["phase"])
    graph = helper.make_graph([node], "tiny", [frames], [phase], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def reg(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture()
def two_versions(reg: ModelRegistry) -> ModelRegistry:
    """v0001 deployed, v0002 published but not deployed."""
    reg.publish({"model.onnx": make_onnx(1.0), "model.pt": b"state-1"}, validation_ssim=0.9)
    reg.publish({"model.onnx": make_onnx(2.0), "model.pt": b"state-2"}, deploy=False)
    assert reg.current_version() == "v0001"
    return reg


def stray_entries(reg: ModelRegistry) -> list[str]:
    return sorted(p.name for p in reg.root.iterdir() if p.name.startswith(".tmp-"))


# ------------------------------------------------------------------------------------------------
# publish / list / current


def test_empty_registry(reg: ModelRegistry) -> None:
    assert reg.versions() == []
    assert reg.current() is None
    assert reg.watch_token().version is None
    assert reg.history() == []


def test_publish_list_current(reg: ModelRegistry) -> None:
    onnx1, onnx2 = make_onnx(1.0), make_onnx(2.0)
    v1 = reg.publish(
        {"model.onnx": onnx1, "model.pt": b"torch-state"},
        training_data=["scan-a"],
        validation_ssim=0.91,
        notes="first",
    )
    assert v1.version == "v0001"
    assert v1.path == reg.root / "versions" / "v0001"
    assert set(REQUIRED_MANIFEST_KEYS) <= set(v1.manifest)
    on_disk = json.loads((v1.path / MANIFEST_NAME).read_text())
    assert on_disk == v1.manifest
    assert on_disk["parent"] is None
    assert on_disk["training_data"] == ["scan-a"]
    assert on_disk["validation_ssim"] == pytest.approx(0.91)
    assert on_disk["files"] == {"model.onnx": sha256(onnx1), "model.pt": sha256(b"torch-state")}
    assert on_disk["model"] == "ptychonn2"
    assert on_disk["input_shape"] == [1, 128, 128]
    assert on_disk["notes"] == "first"
    assert on_disk["onnx"]["model.onnx"]["input"] == "frames"
    assert v1.created.tzinfo is not None and v1.created.utcoffset() == timezone.utc.utcoffset(None)
    assert v1.onnx_path.read_bytes() == onnx1
    assert v1.torch_path is not None and v1.torch_path.read_bytes() == b"torch-state"
    assert v1.onnx_batch is None  # dynamic batch
    assert reg.current() == v1

    v2 = reg.publish({"model.onnx": onnx2}, training_data=["scan-a", "scan-b"])
    assert v2.version == "v0002"
    assert v2.parent == "v0001"  # default parent: the deployed version
    assert v2.torch_path is None
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]
    assert [v.version for v in reg.versions(check_files=True)] == ["v0001", "v0002"]
    assert reg.current() == v2
    assert [e["version"] for e in reg.history()] == ["v0001", "v0002"]
    assert stray_entries(reg) == []


def test_published_model_runs_in_onnxruntime(reg: ModelRegistry) -> None:
    ort = pytest.importorskip("onnxruntime")
    reg.publish({"model.onnx": make_onnx(3.0)})
    current = reg.current()
    assert current is not None
    session = ort.InferenceSession(str(current.onnx_path), providers=["CPUExecutionProvider"])
    frames = np.random.default_rng(0).random((2, 1, 128, 128), dtype=np.float32)
    (phase,) = session.run(None, {"frames": frames})
    np.testing.assert_allclose(phase, 3.0 * frames, rtol=1e-6)


def test_sources_path_and_file_object(reg: ModelRegistry, tmp_path: Path) -> None:
    onnx_file = tmp_path / "net.onnx"
    onnx_file.write_bytes(make_onnx(4.0))
    mv = reg.publish({"model.onnx": onnx_file, "model.pt": io.BytesIO(b"x" * 3_000_000)})
    assert mv.manifest["files"]["model.onnx"] == sha256(onnx_file.read_bytes())
    assert mv.manifest["files"]["model.pt"] == sha256(b"x" * 3_000_000)
    reg.verify(mv.version)


def test_explicit_versions_and_duplicates(reg: ModelRegistry) -> None:
    assert reg.publish({"model.onnx": make_onnx()}, version="baseline").version == "baseline"
    with pytest.raises(RegistryError, match="'baseline' already exists"):
        reg.publish({"model.onnx": make_onnx(5.0)}, version="baseline")
    assert reg.publish({"model.onnx": make_onnx()}, version="v0007").version == "v0007"
    assert reg.publish({"model.onnx": make_onnx()}).version == "v0008"  # continues numbering
    for bad in ("../evil", "", ".hidden", "a/b", "x" * 200):
        with pytest.raises(RegistryError, match="invalid version"):
            reg.publish({"model.onnx": make_onnx()}, version=bad)
    assert [v.version for v in reg.versions()] == ["baseline", "v0007", "v0008"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"files": {"model.pt": b"x"}}, RegistryError, "includes 'model.onnx'"),
        ({"files": {"model.onnx": b"", "manifest.json": b"{}"}}, RegistryError, "written by"),
        ({"files": {"model.onnx": 42}}, TypeError, "path, bytes or a binary file"),
        ({"validation_ssim": 1.5}, RegistryError, "validation_ssim"),
        ({"validation_ssim": float("nan")}, RegistryError, "validation_ssim"),
        ({"training_data": "scan-a"}, RegistryError, "wrap it in a list"),
        ({"training_data": ["ok", 3]}, RegistryError, "scan uid"),
        ({"parent": "v0042"}, RegistryError, "parent version 'v0042' does not exist"),
        ({"input_shape": (1, 128)}, RegistryError, "input_shape"),
        ({"extra": {"x": object()}}, RegistryError, "JSON-serialisable"),
    ],
)
def test_publish_refuses_bad_arguments(
    reg: ModelRegistry, kwargs: dict, exc: type[Exception], match: str
) -> None:
    files = kwargs.pop("files", {"model.onnx": make_onnx()})
    with pytest.raises(exc, match=match):
        reg.publish(files, **kwargs)
    assert reg.versions() == [] and reg.current() is None
    assert stray_entries(reg) == []


# ------------------------------------------------------------------------------------------------
# deploy / rollback / watch


def test_deploy_and_rollback(two_versions: ModelRegistry) -> None:
    reg = two_versions
    token0 = reg.watch_token()
    assert reg.watch_token() == token0  # nothing changed: same token
    assert reg.deploy("v0002").version == "v0002"
    token1 = reg.watch_token()
    assert token1 != token0 and token1.version == "v0002"
    assert reg.deploy("v0002").version == "v0002"  # idempotent, CURRENT untouched
    assert reg.watch_token() == token1

    assert reg.rollback().version == "v0001"  # default: the previously deployed version
    assert reg.current_version() == "v0001"
    assert reg.rollback("v0002").version == "v0002"
    with pytest.raises(RegistryError, match="already deployed"):
        reg.rollback("v0002")
    with pytest.raises(RegistryError, match="no version 'v0099'"):
        reg.deploy("v0099")
    assert [e["action"] for e in reg.history()] == ["publish", "deploy", "rollback", "rollback"]
    pointer = json.loads((reg.root / CURRENT_NAME).read_text())
    assert pointer["version"] == "v0002" and pointer["previous"] == "v0001"


def test_rollback_without_history_is_refused(reg: ModelRegistry) -> None:
    reg.publish({"model.onnx": make_onnx()})
    with pytest.raises(RegistryError, match="no previous deployment"):
        reg.rollback()


def test_corrupt_current_pointer_is_reported(two_versions: ModelRegistry) -> None:
    reg = two_versions
    (reg.root / CURRENT_NAME).write_text("{not json at all")
    with pytest.raises(RegistryError, match="CURRENT is corrupt.*registry deploy"):
        reg.current()
    reg.deploy("v0002")  # the documented repair
    assert reg.current_version() == "v0002"


# ------------------------------------------------------------------------------------------------
# atomicity


class ExplodingSource(io.RawIOBase):
    """A binary file object that fails after handing out some bytes (disk pulled mid-copy)."""

    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls == 1:
            return b"partial-state"
        raise RuntimeError("storage went away mid-publish")


def test_exception_mid_publish_leaves_no_partial_version(two_versions: ModelRegistry) -> None:
    reg = two_versions
    current_bytes = (reg.root / CURRENT_NAME).read_bytes()
    token = reg.watch_token()
    files = {"model.onnx": make_onnx(9.0), "model.pt": ExplodingSource()}  # onnx written first
    with pytest.raises(RuntimeError, match="storage went away"):
        reg.publish(files, version="v0003")
    assert sorted(p.name for p in reg.versions_dir.iterdir()) == ["v0001", "v0002"]
    assert stray_entries(reg) == []
    assert (reg.root / CURRENT_NAME).read_bytes() == current_bytes
    assert reg.watch_token() == token

    with pytest.raises(RegistryError, match="cannot read the source of 'model.pt'"):
        reg.publish({"model.onnx": make_onnx(9.0), "model.pt": reg.root / "no-such-file.pt"})
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]
    assert stray_entries(reg) == []
    assert reg.current_version() == "v0001"
    # the failed attempts used no version number
    assert reg.publish({"model.onnx": make_onnx(9.0)}).version == "v0003"


_CRASHER = """
import os, sys
from edge_ptycho_bluesky.training.registry import ModelRegistry

class Die:
    def read(self, size=-1):
        os._exit(17)  # hard crash: no cleanup, no finally blocks

ModelRegistry(sys.argv[1]).publish(
    {"model.onnx": open(sys.argv[2], "rb"), "model.pt": Die()}, version="v0003"
)
"""


def test_hard_crash_mid_publish_leaves_stray_temp_that_is_ignored_then_cleaned(
    two_versions: ModelRegistry, tmp_path: Path
) -> None:
    reg = two_versions
    current_bytes = (reg.root / CURRENT_NAME).read_bytes()
    onnx_file = tmp_path / "net.onnx"
    onnx_file.write_bytes(make_onnx(7.0))
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(reg.root), str(onnx_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr
    strays = stray_entries(reg)
    assert len(strays) == 1 and strays[0].startswith(".tmp-v0003-")
    assert (reg.root / strays[0] / "model.onnx").exists()  # a partial version really was left
    # readers ignore it
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]
    assert reg.problems() == {}
    assert (reg.root / CURRENT_NAME).read_bytes() == current_bytes
    with pytest.raises(RegistryError, match="no version 'v0003'"):
        reg.get("v0003")
    # the next writer removes it
    mv = reg.publish({"model.onnx": make_onnx(7.0)}, version="v0003")
    assert mv.version == "v0003"
    assert stray_entries(reg) == []
    reg.verify("v0003")


def test_clean_stale_removes_temp_files_and_dirs(reg: ModelRegistry) -> None:
    (reg.root / ".tmp-v0001-deadbeef").mkdir()
    (reg.root / ".tmp-v0001-deadbeef" / "model.onnx").write_bytes(b"half")
    (reg.root / ".tmp-CURRENT-cafe").write_text("{}")
    removed = reg.clean_stale()
    assert sorted(p.name for p in removed) == [".tmp-CURRENT-cafe", ".tmp-v0001-deadbeef"]
    assert stray_entries(reg) == []


def test_concurrent_publishers_get_distinct_versions(reg: ModelRegistry) -> None:
    errors: list[BaseException] = []

    def worker(scale: float) -> None:
        try:
            for i in range(3):
                reg.publish({"model.onnx": make_onnx(scale + i)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (10.0, 20.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.version for v in reg.versions(check_files=True)] == [f"v{i:04d}" for i in range(1, 7)]


# ------------------------------------------------------------------------------------------------
# damaged or incompatible models are refused; the previous model stays deployed


def test_tampered_file_is_refused(two_versions: ModelRegistry) -> None:
    reg = two_versions
    (reg.versions_dir / "v0002" / "model.pt").write_bytes(b"state-2 but evil")
    with pytest.raises(RegistryError, match=r"v0002.*model\.pt has sha256 .* but the manifest"):
        reg.deploy("v0002")
    assert reg.current_version() == "v0001"
    current = reg.current()
    assert current is not None and current.version == "v0001"
    assert "v0002" in reg.problems(check_files=True)
    assert [v.version for v in reg.versions(check_files=True)] == ["v0001"]
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]  # manifest itself is fine


def test_damage_to_the_deployed_version_is_detected_on_load(two_versions: ModelRegistry) -> None:
    reg = two_versions
    onnx_path = reg.versions_dir / "v0001" / "model.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes()[:-7])
    with pytest.raises(RegistryError, match=r"v0001.*model\.onnx has sha256"):
        reg.current()
    assert reg.current(verify=False) is not None  # pointer still readable for diagnosis


@pytest.mark.parametrize("keep", [0.5, 0.9, 20])
def test_truncated_onnx_is_refused_at_publish(two_versions: ModelRegistry, keep: float) -> None:
    reg = two_versions
    data = make_onnx(6.0)
    cut = int(len(data) * keep) if keep < 1 else int(keep)
    with pytest.raises(RegistryError, match=r"model\.onnx.*(truncated|corrupt)"):
        reg.publish({"model.onnx": data[:cut]})
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]
    assert stray_entries(reg) == []
    assert reg.current_version() == "v0001"


def test_truncated_onnx_with_matching_checksum_is_refused_at_deploy(
    two_versions: ModelRegistry,
) -> None:
    """Even a manifest edited to match a truncated file does not get it deployed."""
    reg = two_versions
    vdir = reg.versions_dir / "v0002"
    truncated = (vdir / "model.onnx").read_bytes()[:100]
    (vdir / "model.onnx").write_bytes(truncated)
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"] = sha256(truncated)
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"v0002.*model\.onnx.*(truncated|corrupt)"):
        reg.deploy("v0002")
    assert reg.current_version() == "v0001"


def test_missing_or_corrupt_manifest_is_refused(two_versions: ModelRegistry) -> None:
    reg = two_versions
    (reg.versions_dir / "v0002" / MANIFEST_NAME).unlink()
    with pytest.raises(RegistryError, match=r"v0002.*manifest\.json is missing.*publish"):
        reg.deploy("v0002")
    assert reg.current_version() == "v0001"
    assert [v.version for v in reg.versions()] == ["v0001"]
    assert "missing" in reg.problems()["v0002"]

    (reg.versions_dir / "v0002" / MANIFEST_NAME).write_text("{truncated")
    with pytest.raises(RegistryError, match="not valid JSON"):
        reg.rollback("v0002")
    (reg.versions_dir / "v0002" / MANIFEST_NAME).write_text(json.dumps({"version": "v0002"}))
    with pytest.raises(RegistryError, match="lacks the keys"):
        reg.deploy("v0002")
    assert reg.current_version() == "v0001"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_shape": (1, 64, 64)}, r"input 'frames' has shape \(\?, 1, 64, 64\)"),
        ({"in_shape": (3, 128, 128)}, r"has shape \(\?, 3, 128, 128\)"),
        ({"in_shape": (128, 128)}, r"has shape \(\?, 128, 128\)"),
        ({"out_shape": (1, 64, 64)}, r"output 'phase' has shape"),
        ({"batch": 8, "out_shape": None}, None),  # fixed batch 8 is fine
    ],
)
def test_incompatible_onnx_shapes(
    two_versions: ModelRegistry, kwargs: dict, match: str | None
) -> None:
    reg = two_versions
    data = make_onnx(**kwargs)
    if match is None:
        mv = reg.publish({"model.onnx": data})
        assert mv.onnx_batch == 8 and reg.current_version() == mv.version
        return
    with pytest.raises(RegistryError, match=match + r".*expected \(batch, 1, 128, 128\)"):
        reg.publish({"model.onnx": data})
    assert [v.version for v in reg.versions()] == ["v0001", "v0002"]
    assert reg.current_version() == "v0001"
    assert stray_entries(reg) == []


def test_swapped_in_wrong_shape_model_is_refused_at_deploy(two_versions: ModelRegistry) -> None:
    reg = two_versions
    vdir = reg.versions_dir / "v0002"
    wrong = make_onnx(in_shape=(1, 256, 256))
    (vdir / "model.onnx").write_bytes(wrong)
    manifest = json.loads((vdir / MANIFEST_NAME).read_text())
    manifest["files"]["model.onnx"] = sha256(wrong)
    (vdir / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match=r"has shape \(\?, 1, 256, 256\)"):
        reg.deploy("v0002")
    assert reg.current_version() == "v0001"


# ------------------------------------------------------------------------------------------------
# import of existing ONNX files


def test_import_onnx_tiny(reg: ModelRegistry, tmp_path: Path) -> None:
    src = tmp_path / "external.onnx"
    src.write_bytes(make_onnx(8.0, batch=4))
    mv = import_onnx(reg, src, version="external", validation_ssim=0.8, notes="from elsewhere")
    assert mv.version == "external" and reg.current_version() == "external"
    assert mv.parent is None
    assert mv.onnx_batch == 4
    assert mv.manifest["extra"]["imported_from"] == str(src.resolve())
    assert mv.validation_ssim == pytest.approx(0.8)


def test_import_onnx_refuses_bad_file_before_touching_registry(
    reg: ModelRegistry, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(make_onnx(in_shape=(2, 128, 128)))
    with pytest.raises(RegistryError, match="bad.onnx: input 'frames' has shape"):
        import_onnx(reg, bad)
    with pytest.raises(RegistryError, match="does not exist"):
        import_onnx(reg, tmp_path / "absent.onnx")
    assert reg.versions() == [] and stray_entries(reg) == []


@pytest.mark.skipif(not PAPER_ONNX.exists(), reason=f"paper's ONNX not found at {PAPER_ONNX}")
def test_import_paper_onnx(reg: ModelRegistry) -> None:
    info = check_onnx_contract(PAPER_ONNX)
    assert info.batch == 8 and info.input_name == "input.1" and info.input_shape == (8, 1, 128, 128)
    mv = import_onnx(reg, PAPER_ONNX, notes="Babu, Zhou et al. 2023")
    assert isinstance(mv, ModelVersion) and mv.version == "v0001"
    assert reg.current() == mv
    assert mv.onnx_batch == 8
    sums = dict(
        reversed(line.split(maxsplit=1))
        for line in (SHARED_DATA / "SHA256SUMS").read_text().splitlines()
        if line.strip()
    )
    expected = next(d for name, d in sums.items() if name.lstrip("*").endswith("ptychoNN_8.onnx"))
    assert mv.manifest["files"]["model.onnx"] == expected


@pytest.mark.skipif(not PAPER_ONNX.exists(), reason=f"paper's ONNX not found at {PAPER_ONNX}")
def test_truncated_paper_onnx_is_refused(reg: ModelRegistry, tmp_path: Path) -> None:
    good = import_onnx(reg, PAPER_ONNX)
    data = PAPER_ONNX.read_bytes()
    half = tmp_path / "half.onnx"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(RegistryError, match=r"half\.onnx: not a readable ONNX model.*truncated"):
        import_onnx(reg, half)
    with pytest.raises(RegistryError, match=r"model\.onnx.*truncated"):
        reg.publish({"model.onnx": data[:-1]})
    assert reg.versions() == [good] and reg.current() == good


# ------------------------------------------------------------------------------------------------
# CLI


def _parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    monkeypatch.delenv(REGISTRY_ENV, raising=False)
    parser = argparse.ArgumentParser(prog="edge-ptycho")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(parser: argparse.ArgumentParser, *argv: str) -> int:
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_import_list_show_deploy_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _parser(monkeypatch)
    root = str(tmp_path / "models")
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(make_onnx(1.0))
    b.write_bytes(make_onnx(2.0, batch=8))

    assert _run(parser, "import-onnx", str(a), "--registry", root) == 0
    argv = ["import-onnx", str(b), "--registry", root, "--version", "paper", "--no-deploy"]
    assert _run(parser, *argv) == 0
    assert "imported" in capsys.readouterr().out

    assert _run(parser, "registry", "list", "--registry", root, "--verify") == 0
    out = capsys.readouterr().out
    assert "* v0001" in out and "  paper" in out

    assert _run(parser, "registry", "deploy", "--registry", root, "paper") == 0
    assert ModelRegistry(root).current_version() == "paper"
    assert _run(parser, "registry", "show", "--registry", root) == 0
    out = capsys.readouterr().out
    assert '"version": "paper"' in out and "verified" in out

    assert _run(parser, "registry", "rollback", "--registry", root, "v0001") == 0
    assert ModelRegistry(root).current_version() == "v0001"

    assert _run(parser, "registry", "deploy", "--registry", root, "nope") == 1
    assert "no version 'nope'" in capsys.readouterr().err
    assert ModelRegistry(root).current_version() == "v0001"


def test_cli_refuses_missing_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = _parser(monkeypatch)
    assert _run(parser, "registry", "list", "--registry", str(tmp_path / "nowhere")) == 1
    assert "not a model registry" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(SystemExit):
        parser.parse_args(["registry", "list"])  # --registry required without the env variable
