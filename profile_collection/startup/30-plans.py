# Plans. Examples: RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=200))
#                 RE(spiral_ptycho_flyscan(fly_det, stage.x, stage.y, step=0.05, num_points=963, rate=2000))
import bluesky.plan_stubs as bps
import bluesky.plans as bp

from edge_ptycho_bluesky.plans import rel_spiral_ptycho_scan, spiral_ptycho_flyscan, spiral_ptycho_scan
