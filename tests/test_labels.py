"""Training labels cut from a reconstruction: placement, phase reference, corpus files, Tiled."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from edge_ptycho_bluesky.recon.labels import (
    LABELS_PURPOSE,
    LabelledScan,
    concatenate,
    extract_labels,
    find_labels,
    labels_from_reconstruction,
    load_corpus,
    phase_reference,
    save_corpus,
    store_labels,
)
from edge_ptycho_bluesky.recon.rpie_options import RPIEOptions, RPIEResult

N = 32  # patch size for these tests (the production one is 128)


def smooth_object(shape=(96, 100), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    phase = 0.4 * np.sin(rows / 7.0) * np.cos(cols / 9.0) + 0.05 * rng.normal(size=shape)
    return np.exp(1j * phase).astype(np.complex64)


def fake_result(obj: np.ndarray, positions: np.ndarray) -> RPIEResult:
    illum = np.zeros(obj.shape, dtype=np.float32)
    for r, c in np.floor(positions).astype(int):
        illum[r:r + N, c:c + N] += 1
    return RPIEResult(object=obj, probe=np.ones((N, N), np.complex64), positions=positions,
                      errors=np.array([0.1, 0.01]), pixel_size_nm=11.6, iterations=2, time_s=0.1,
                      illumination=illum, options=RPIEOptions(iterations=2))


def test_labels_are_centred_on_every_position():
    obj = np.ones((96, 100), dtype=np.complex64)
    positions = np.array([[5.0, 7.0], [30.0, 41.0], [50.0, 60.0]])
    for r, c in positions.astype(int):  # a bright phase dot at the centre of every window
        obj[r + N // 2, c + N // 2] = np.exp(1j * 1.0)
    labels, ref = extract_labels(obj, positions, patch_size=N, reference="none")
    assert ref == 0.0
    for patch in labels:
        assert np.unravel_index(np.argmax(patch), patch.shape) == (N // 2, N // 2)
        assert patch[N // 2, N // 2] == pytest.approx(1.0, abs=1e-6)


def test_subpixel_labels_interpolate_the_complex_object():
    rows, cols = np.mgrid[:96, :100]
    phase = 0.01 * rows + 0.02 * cols  # linear: bilinear interpolation is exact
    obj = np.exp(1j * phase).astype(np.complex64)
    positions = np.array([[10.25, 20.5], [33.75, 4.125]])
    labels, _ = extract_labels(obj, positions, patch_size=N, reference="none")
    i, j = np.mgrid[:N, :N]
    for patch, (r, c) in zip(labels, positions):
        np.testing.assert_allclose(patch, 0.01 * (r + i) + 0.02 * (c + j), atol=2e-4)


def test_phase_reference_is_stated_and_consistent():
    obj = smooth_object()
    positions = np.array([[10.0, 12.0], [20.5, 30.25], [40.0, 50.0], [55.0, 60.0]])
    base, ref0 = extract_labels(obj, positions, patch_size=N)
    shifted, ref1 = extract_labels(obj * np.exp(1j * 0.7), positions, patch_size=N)
    np.testing.assert_allclose(shifted, base, atol=1e-5)  # a global phase does not change the labels
    assert ref1 - ref0 == pytest.approx(0.7, abs=1e-5)
    # The stated reference: the median phase over the scanned region is 0 after subtraction.
    region = np.zeros(obj.shape, dtype=bool)
    for r, c in np.floor(positions).astype(int):
        region[r:r + N + 1, c:c + N + 1] = True
    assert phase_reference(obj * np.exp(-1j * ref0), region) == pytest.approx(0.0, abs=1e-5)

    scan = labels_from_reconstruction(fake_result(obj, positions), np.ones((4, N, N)), scan_uid="raw-1")
    _, meta = scan.to_arrays()
    assert meta["phase_reference_method"] == "median over the scanned region set to 0"
    assert meta["scan_uid"] == "raw-1" and meta["metadata"]["iterations"] == 2


def test_bad_label_requests_are_refused():
    obj = smooth_object()
    with pytest.raises(ValueError, match="outside"):
        extract_labels(obj, np.array([[90.0, 10.0]]), patch_size=N)
    with pytest.raises(ValueError, match="reference"):
        extract_labels(obj, np.array([[1.0, 1.0]]), patch_size=N, reference="mean")
    with pytest.raises(ValueError, match="2 positions"):
        labels_from_reconstruction(fake_result(obj, np.array([[1.0, 1.0], [2.0, 2.0]])), np.ones((3, N, N)),
                                   scan_uid="x")


@pytest.mark.parametrize("suffix", [".npz", ".h5"])
def test_corpus_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(3)
    scans = [
        LabelledScan(frames=rng.poisson(5, (k, N, N)).astype(np.float32),
                     phases=rng.uniform(-1, 1, (k, N, N)).astype(np.float32),
                     positions=rng.uniform(0, 50, (k, 2)), scan_uid=f"uid-{k}", pixel_size_nm=11.6,
                     phase_reference=0.1 * k, metadata={"solver": "test", "k": k})
        for k in (3, 5)
    ]
    path = save_corpus(tmp_path / f"corpus{suffix}", scans)
    back = load_corpus(path)
    assert [s.scan_uid for s in back] == ["uid-3", "uid-5"]
    for a, b in zip(scans, back):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.phases, b.phases)
        np.testing.assert_array_equal(a.positions, b.positions)
        assert b.phase_reference == a.phase_reference and dict(b.metadata) == dict(a.metadata)
    frames, phases, index = concatenate(back)
    assert frames.shape == (8, N, N) and list(index) == [0, 0, 0, 1, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="must end in"):
        save_corpus(tmp_path / "corpus.txt", scans)


def test_labels_stored_in_tiled_as_a_derived_run(tiled_client, storage_config):
    from edge_ptycho_bluesky.derived import find_derived_runs
    from edge_ptycho_bluesky.storage import make_tiled_writer

    raw_uid = str(uuid.uuid4())
    obj = smooth_object()
    positions = np.array([[10.0, 12.0], [20.5, 30.25], [40.0, 50.0]])
    frames = np.random.default_rng(0).poisson(5, (3, N, N)).astype(np.float32)
    labels = labels_from_reconstruction(fake_result(obj, positions), frames, scan_uid=raw_uid)

    writer = make_tiled_writer(tiled_client, storage_config)
    derived_uid = store_labels(writer, labels, storage_config.frames_dir)
    runs = find_derived_runs(tiled_client, raw_uid, LABELS_PURPOSE)
    assert [run.metadata["start"]["uid"] for run in runs] == [derived_uid]
    assert runs[0].metadata["start"]["original_run_uid"] == raw_uid

    back = find_labels(tiled_client, raw_uid)
    np.testing.assert_array_equal(back.phases, labels.phases)
    np.testing.assert_array_equal(back.frames, labels.frames)
    np.testing.assert_allclose(back.positions, labels.positions)
    assert back.phase_reference == pytest.approx(labels.phase_reference)
    assert back.scan_uid == raw_uid and back.pixel_size_nm == pytest.approx(11.6)

    with pytest.raises(KeyError, match="no 'rpie_labels' run"):
        find_labels(tiled_client, str(uuid.uuid4()))
