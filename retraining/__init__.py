"""Triggered retraining: the job queue and worker, the three retraining tiers, and the champion/challenger gate."""
