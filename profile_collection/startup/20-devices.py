# The simulated beamline: piezo stage `stage` (um), step detector `det` and fly-scan detector `fly_det`
# (frames over pvAccess at a set rate) looking at a training sample.
from edge_ptycho_bluesky.devices import make_simulated_beamline

beamline = make_simulated_beamline(storage.frames_dir, sample="train")
stage, det, fly_det = beamline.stage, beamline.det, beamline.fly_det
