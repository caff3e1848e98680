"""Imbalance-aware training: samplers, losses, augmentation, decoupling, post-hoc adjustment, metrics."""
