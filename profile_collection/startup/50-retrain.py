# Continual learning, the paper's loop: a labelled scan (overlap >= 0.8 by default, or
#     RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=400, labelled=True))
# is reconstructed with rPIE in a separate process (never on the RunEngine's thread); its labels
# validate the deployed model and, when it has drifted (or there is none yet), it is retrained and
# published to the registry that the edge worker serves, which hot-swaps it without a restart.
# `retrain.status()`, `retrain.outcomes`, `retrain.failed` / `retrain.retry_failed()`;
# outcomes are also stored in Tiled (derived runs, purpose "retraining_job").
# EDGE_PTYCHO_RETRAIN=0 turns this off; EDGE_PTYCHO_RETRAIN_EXECUTOR=process|thread|dask picks
# where jobs run; EDGE_PTYCHO_RETRAIN_EPOCHS sets the epochs per training increment (50).
# Jobs run in spawned processes, which re-run a script's top level: scripts run with
# `ipython script.py` or `%run` that start scans must keep them under `if __name__ == "__main__":`
# (or use EDGE_PTYCHO_RETRAIN_EXECUTOR=thread).
from edge_ptycho_bluesky.callbacks.retrain import start_retraining

retrain = start_retraining(RE, catalog, storage)
