# RunEngine, BestEffortCallback and loopback-only EPICS settings.
import logging

import matplotlib.pyplot as plt
from bluesky import RunEngine
from bluesky.callbacks.best_effort import BestEffortCallback
from bluesky.utils import ProgressBarManager

from edge_ptycho_bluesky.edge.transport import loopback_env

loopback_env()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
plt.ion()

RE = RunEngine({})
RE.waiting_hook = ProgressBarManager()
bec = BestEffortCallback()
RE.subscribe(bec)
