# The simulated beamline: piezo stage `stage` (um) and detector `det` looking at a training sample.
from edge_ptycho_bluesky.devices import make_simulated_beamline

beamline = make_simulated_beamline(storage.frames_dir, sample="train")
stage, det = beamline.stage, beamline.det
