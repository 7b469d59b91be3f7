# RunEngine, BestEffortCallback and the pvAccess settings: the session's own channels on loopback,
# the beamline's EPICS_PVA_ADDR_LIST (when set) kept, so its pvAccess devices stay reachable.
import logging

import matplotlib.pyplot as plt
from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback
from bluesky.utils import ProgressBarManager

from edge_ptycho_bluesky.edge.transport import embedded_worker_env

embedded_worker_env()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
plt.ion()

RE = RunEngine({})
RE.waiting_hook = ProgressBarManager()
bec = BestEffortCallback()
RE.subscribe(bec)
