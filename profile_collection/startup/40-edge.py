# Edge inference: each frame goes to the edge worker over pvAccess (loopback), its phase patch
# comes back, is stitched live (and plotted with a GUI backend), and at the end of the scan the
# stitched image + patches are stored in Tiled as a derived run of the raw run.
# Default: a worker is started here on the model deployed in $EDGE_PTYCHO_REGISTRY
# (default <data dir>/registry) and stopped at exit. An empty registry gets the model shipped with
# the package (edge-ptycho registry init DIR); import another with
#     edge-ptycho import-onnx FILE.onnx --registry DIR
# EDGE_PTYCHO_EDGE=0 turns this off; EDGE_PTYCHO_EDGE_WORKER=external uses a worker started with
#     edge-ptycho worker --registry DIR
# `edge.status()` reads the worker's status; `edge.stitch.results[uid]` holds a run's stitch;
# Fly scans: RE(spiral_ptycho_flyscan(fly_det, stage.x, stage.y, step=0.05, num_points=963, rate=2000)).
# `edge.replay(uid)` re-infers a stored scan with the current model (stored beside the old one).
from edge_ptycho_bluesky.callbacks.session import start_edge_session
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig
from edge_ptycho_bluesky.training.shipped import init_registry_if_empty

init_registry_if_empty(EdgeSessionConfig.from_env(storage.data_dir).registry)
edge = start_edge_session(RE, catalog, storage)
if edge is not None and hasattr(fly_det, "publisher"):  # the simulated fly_det streams straight to the worker
    edge.attach_fly_detector(fly_det)
