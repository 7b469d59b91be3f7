"""Continual training: corpus, trainer, retraining policy and the versioned model registry."""
