"""A simulated beamline that speaks EPICS: ``edge-ptycho ioc`` (:mod:`.server`).

Motor records, an ADSimDetector-compatible driver, an NDFileHDF5-compatible writer and an
NTNDArray stream, served over Channel Access (caproto) and pvAccess, so that stock ophyd and
ophyd-async devices drive it as they drive a real beamline. :class:`.process.IocProcess` runs it
as a child process.
"""
