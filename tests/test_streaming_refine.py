"""Streaming, AI-seeded rPIE (:mod:`edge_ptycho_bluesky.recon.streaming`) on simulated scans with
known truth; the "AI" here is a deliberately poor estimate (the truth blurred, scaled and noised),
so that the tests do not depend on a trained network."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from edge_ptycho_bluesky.metrics import compare
from edge_ptycho_bluesky.options import UnknownOptionError
from edge_ptycho_bluesky.recon.streaming import RefineOptions, StreamingRefiner
from edge_ptycho_bluesky.sim import beam_diameter_nm, fermat_spiral, make_sample, step_for_overlap

EXPOSURE_S = 0.01
BEAM_UM = 0.8


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@lru_cache(maxsize=None)
def scan(overlap: float, points: int):
    step = step_for_overlap(overlap, BEAM_UM) if overlap > 0 else BEAM_UM
    xy = fermat_spiral(points, step)
    sample = make_sample("test", extent_um=float(np.abs(xy).max()) + 0.05, seed=3,
                         beam_diameter_nm=BEAM_UM * 1e3)
    frames = sample.measure(xy, EXPOSURE_S, rng=0).astype(np.float32)
    corners = sample.window_positions(xy)
    n = frames.shape[-1]
    # A poor network: the truth's windows, blurred, at 60 % of the phase, with noise.
    rng = np.random.default_rng(0)
    blurred = gaussian_filter(sample.phase, 3) * 0.6
    r0, c0 = np.floor(corners).astype(int).T
    patches = np.stack([blurred[r:r + n, c:c + n] for r, c in zip(r0, c0)])
    patches = (patches + rng.normal(0, 0.05, patches.shape)).astype(np.float32)
    pixel = sample.geometry.pixel_size_nm
    return sample, frames, corners, patches, beam_diameter_nm(sample.probe, pixel) / pixel


def refiner(sample, beam_px, **options) -> StreamingRefiner:
    # The simulator's probe is per second of exposure: the refiner scales it to the frames' counts.
    return StreamingRefiner(sample.phase.shape, sample.probe, beam_diameter_px=beam_px,
                            options=RefineOptions(threads=2, **options))


def ssim(sample, corners, image) -> float:
    n = 128
    mask = np.zeros(sample.phase.shape, dtype=bool)
    for r, c in np.floor(corners).astype(int):
        mask[r + n // 4:r + 3 * n // 4, c + n // 4:c + 3 * n // 4] = True
    return compare(sample.phase, image, mask)["ssim"]


def test_streamed_refinement_beats_the_ai_mosaic_at_high_overlap():
    sample, frames, corners, patches, beam_px = scan(0.9, 80)
    ref = refiner(sample, beam_px)
    for i in range(0, len(frames), 20):  # frames arrive in chunks; one sweep after each
        assert ref.add(frames[i:i + 20], corners[i:i + 20], patches[i:i + 20]) == 20
        ref.sweep()
    ai = ssim(sample, corners, ref.ai_image)
    ref.refine(seconds=4)
    refined = ssim(sample, corners, ref.image)
    assert refined > 0.9 and refined > ai + 0.2, (refined, ai)
    stats = ref.stats.to_dict()
    assert stats["frames_used"] == 80 and stats["sweeps"] > 4 and stats["frame_updates_per_s"] > 0
    assert ref.density.max() > 5  # many frames per pixel at overlap 0.9


def test_at_overlap_zero_the_image_keeps_the_ai_estimate():
    sample, frames, corners, patches, beam_px = scan(0.0, 25)
    ref = refiner(sample, beam_px)
    ref.add(frames, corners, patches)
    ref.refine(seconds=2)
    ai, refined = ssim(sample, corners, ref.ai_image), ssim(sample, corners, ref.image)
    raw = ssim(sample, corners, np.angle(ref.object))
    assert refined >= ai - 0.01, (refined, ai, raw)
    assert ref.density.max() < ref.options.min_density + 0.1  # too few frames per pixel to invert


def test_bad_frames_are_counted_and_skipped():
    sample, frames, corners, patches, beam_px = scan(0.9, 80)
    ref = refiner(sample, beam_px)
    f, pos = frames[:6].copy(), corners[:6].copy()
    pos[0] = np.nan                            # no position
    f[1, 3, 3] = np.nan                        # NaN counts
    f[2, 0, 0] = -1                            # negative counts
    pos[3] = (-5.0, 0.0)                       # outside the canvas
    pos[4] = (sample.phase.shape[0], 0.0)      # outside the canvas
    bad_patches = patches[:6].copy()
    bad_patches[5, 0, 0] = np.nan              # a NaN patch: the frame is kept, not seeded
    assert ref.add(f, pos, bad_patches) == 1
    assert ref.stats.skipped == {"no_position": 1, "bad_frame": 2, "outside": 2, "bad_patch": 1}
    assert ref.stats.frames_used == 1 and np.isfinite(ref.sweep())
    with pytest.raises(ValueError, match="frames must be"):
        ref.add(frames[:2, :64, :64], corners[:2])


def test_the_frame_buffer_is_bounded():
    sample, frames, corners, patches, beam_px = scan(0.9, 80)
    ref = refiner(sample, beam_px, buffer_frames=16)
    for i in range(0, 48, 8):
        ref.add(frames[i:i + 8], corners[i:i + 8], patches[i:i + 8])
        ref.sweep()
    assert ref.stats.frames_used == 48
    assert ref.buffered_frames == 16
    assert np.isfinite(ref.image).all()


def test_options_are_checked():
    with pytest.raises(UnknownOptionError, match="bufer_frames"):
        RefineOptions.from_mapping({"bufer_frames": 10})
    with pytest.raises(ValueError, match="min_density"):
        RefineOptions(min_density=0.8, full_density=0.5)
    with pytest.raises(ValueError, match="alpha"):
        RefineOptions(alpha=3.0)
    assert RefineOptions.from_mapping({"threads": 2}).threads == 2


def test_a_pass_over_the_newest_frames_touches_only_their_windows():
    from edge_ptycho_bluesky.recon.reconstructor import RPIEReconstructor
    from edge_ptycho_bluesky.recon.rpie_options import RPIEOptions

    sample, frames, corners, _, _ = scan(0.9, 80)
    rec = RPIEReconstructor(sample.phase.shape, probe=sample.probe * np.sqrt(EXPOSURE_S),
                            options=RPIEOptions(update_probe=False, phase_reference=False, batching="compact"))
    rec.add_frames(frames, corners)
    before = rec.object
    assert rec.update_frames([]) == 0.0 and rec.result().iterations == 0
    error = rec.update_frames([78, 79])
    after = rec.object
    assert error > 0 and rec.result().iterations == 0            # not an iteration
    changed = np.abs(after - before) > 0
    window = np.zeros_like(changed)
    for r, c in np.floor(corners[78:]).astype(int):
        window[r:r + 129, c:c + 129] = True  # a sub-pixel position may round to the next pixel
    assert changed.any() and not (changed & ~window).any()
    with pytest.raises(ValueError, match="frame indices"):
        rec.update_frames([80])
    # more frames than one of the plan's batches (80 frames in two batches of 40): split to fit
    assert rec.update_frames(np.arange(20, 80)) > 0
