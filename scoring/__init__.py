"""Batch scoring of call-centre logs (`equipoise score`): turns streamed from JSONL, CSV or Parquet, grouped into
conversations, scored by the same `InferenceRuntime.classify` as the API (in this process or on a Ray actor
pool), written per utterance with a per-conversation summary, resumable after a kill through a manifest.
"""
