# Plans. Examples: RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=200))
#                 RE(spiral_ptycho_flyscan(fly_det, stage.x, stage.y, step=0.05, num_points=963, rate=2000))
# With a beamline whose detector does not report the geometry and probe (EDGE_PTYCHO_BEAMLINE=ioc),
# PLAN_DEFAULTS gives them to the spiral plans (an explicit geometry=/probe= still wins).
import functools

import bluesky.plan_stubs as bps
import bluesky.plans as bp

from edge_ptycho_bluesky.plans import rel_spiral_ptycho_scan, spiral_ptycho_flyscan, spiral_ptycho_scan

if PLAN_DEFAULTS:
    spiral_ptycho_scan = functools.partial(spiral_ptycho_scan, **PLAN_DEFAULTS)
    rel_spiral_ptycho_scan = functools.partial(rel_spiral_ptycho_scan, **PLAN_DEFAULTS)
    spiral_ptycho_flyscan = functools.partial(spiral_ptycho_flyscan, **PLAN_DEFAULTS)
