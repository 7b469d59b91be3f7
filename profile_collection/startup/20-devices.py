# The beamline, chosen by EDGE_PTYCHO_BEAMLINE:
#   sim (default): in-process simulated devices: piezo stage `stage` (um), step detector `det` and
#       fly-scan detector `fly_det` (frames over pvAccess at a set rate) looking at a training sample;
#   ioc: stock ophyd-async devices (motor records, ADSimDetector with its HDF5 writer) on the EPICS
#       IOC EDGE_PTYCHO_IOC_PREFIX (default 13SIM1:), started here (`edge-ptycho ioc`) when none
#       answers; `det` also flies (fly_det is det). The plans get the IOC's geometry and probe.
import os

PLAN_DEFAULTS = {}  # geometry=/probe= the beamline's detector does not report (30-plans.py applies them)
if os.environ.get("EDGE_PTYCHO_BEAMLINE", "sim").strip().lower() == "ioc":
    from edge_ptycho_bluesky.ioc.devices import connect_ioc_beamline

    beamline = connect_ioc_beamline(storage.frames_dir, log_dir=storage.data_dir / "logs")
    stage, det, fly_det = beamline.stage, beamline.det, beamline.det
    PLAN_DEFAULTS = beamline.plan_defaults
    os.environ.setdefault("EDGE_PTYCHO_EDGE_DETECTOR", beamline.image_channel)  # live frames: the IOC's stream
else:
    from edge_ptycho_bluesky.devices import make_simulated_beamline

    beamline = make_simulated_beamline(storage.frames_dir, sample="train")
    stage, det, fly_det = beamline.stage, beamline.det, beamline.fly_det
