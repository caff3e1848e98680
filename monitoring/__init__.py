"""Drift and per-class recall monitoring, label-free recall estimation and collapse detection."""
