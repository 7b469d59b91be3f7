"""Continual training: corpus, trainer, retraining policy and the versioned model registry.

The route through training: :mod:`.config` (settings and records), :mod:`.loop` (``fit``, the
paper's recipe), :mod:`.continual` (the corpus-growing ``ContinualTrainer``, which exports and
publishes), :mod:`.evaluate` (SSIM against labels), :mod:`.labelling` (labelled scans from stored
runs) and :mod:`.jobs` (the retraining job); :mod:`.ddp` runs ``fit`` data-parallel under torchrun
and :mod:`.cli` is ``edge-ptycho train``.
"""
