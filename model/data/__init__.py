"""Readers for the training corpora and the call-centre turn format."""
