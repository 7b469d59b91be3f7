"""Real-time, AI-at-the-edge ptychography for Bluesky beamlines.

Follows Babu, Zhou et al., "Deep learning at the edge enables real-time streaming ptychographic
imaging", Nat. Commun. 14, 7059 (2023). The engine (physics, reconstruction, models, edge worker)
is importable without a RunEngine; Bluesky plans and callbacks live in
:mod:`edge_ptycho_bluesky.plans` and :mod:`edge_ptycho_bluesky.callbacks`.
"""

__version__ = "0.1.0"

#: Edge of the square detector frames, and of the network's input and phase patches, in pixels
#: (the paper's 128 x 128): every module takes it from here.
FRAME_SIZE = 128
