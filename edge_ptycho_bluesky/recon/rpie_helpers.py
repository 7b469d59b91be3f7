"""Small numerical helpers of the rPIE engine (:mod:`edge_ptycho_bluesky.recon.reconstructor`):
the torch device, the Z-order that groups positions into batches, Fourier phase ramps for sub-pixel
shifts, FFT-friendly lengths and the orthogonalisation of probe modes."""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = ["fast_fft_len", "morton_order", "orthogonalize_modes", "resolve_device", "shift_ramps"]


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU; use device='cpu'")
    return dev


def morton_order(positions: NDArray[np.float64], cell: float) -> NDArray[np.int64]:
    """Indices sorting positions along a Z-order (Morton) curve of ``cell``-pixel cells."""
    cells = np.floor((positions - positions.min(axis=0)) / cell).astype(np.int64)
    code = np.zeros(len(positions), dtype=np.int64)
    for bit in range(20):
        code |= ((cells[:, 0] >> bit) & 1) << (2 * bit + 1)
        code |= ((cells[:, 1] >> bit) & 1) << (2 * bit)
    return np.argsort(code, kind="stable")


def shift_ramps(freq: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Fourier phase ramps ``exp(-2 pi i (f0 s0 + f1 s1))`` of shape (S, N, N) for shifts (S, 2)."""
    r0 = torch.exp(-2j * math.pi * shifts[:, 0, None] * freq[None, :])
    r1 = torch.exp(-2j * math.pi * shifts[:, 1, None] * freq[None, :])
    return (r0[:, :, None] * r1[:, None, :]).to(torch.complex64)


def fast_fft_len(n: int) -> int:
    """Smallest length >= n whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def orthogonalize_modes(probe: torch.Tensor) -> torch.Tensor:
    """Orthogonal modes with the same density matrix, sorted by power (K, N, N)."""
    k = probe.shape[0]
    flat = probe.reshape(k, -1)
    gram = flat.conj() @ flat.T  # (K, K) Hermitian: <p_a, p_b>
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    new = evecs[:, order].T @ flat
    return new.reshape(probe.shape).to(torch.complex64)

