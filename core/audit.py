"""Keyed random sampling of predictions: which are offered for random labelling (audit), and which requests a
challenger also scores in shadow (api/shadow.py).

A prediction is selected when a keyed hash of its id, read as a fraction of 2**64, falls below the share. The id
is drawn before the model answers (a random UUID in the service; a hash of the run and the turn in batch scoring)
and the hash is keyed for each purpose alone, so a selection is independent of what was said and what was
predicted, and the audit and shadow selections are independent of each other: audit labels are a simple random
sample of the traffic, unlike corrections, which users send for mistakes. Anyone holding the id and the share can
recompute the choice: the service flags the answer with it and checks an audit label against it later. Raising
the share keeps every earlier selection (the selected set only grows); lowering it withdraws the offer from the
ids between the two shares.
"""

from __future__ import annotations

import hashlib
import uuid

_HASH_BYTES = 8
_SCALE = 2 ** (8 * _HASH_BYTES)
# Each purpose keys the hash (at most 16 bytes), so no other use of prediction ids correlates with its selection.
_AUDIT = b"equipoise-audit"
_SHADOW = b"equipoise-shadow"


def keyed_point(prediction_id: uuid.UUID, purpose: bytes) -> int:
    """The id's position in [0, 2**64) for `purpose`: uniform over ids, whatever their structure."""
    digest = hashlib.blake2b(prediction_id.bytes, digest_size=_HASH_BYTES, person=purpose).digest()
    return int.from_bytes(digest, "big")


def audit_point(prediction_id: uuid.UUID) -> int:
    return keyed_point(prediction_id, _AUDIT)


def selected_for_audit(prediction_id: uuid.UUID, share: float) -> bool:
    """True when the prediction is offered for audit at `share` (0: none, 1: all)."""
    return audit_point(prediction_id) < share * _SCALE


def selected_for_shadow(prediction_id: uuid.UUID, share: float) -> bool:
    """True when the request whose first prediction is `prediction_id` is scored in shadow at `share`."""
    return keyed_point(prediction_id, _SHADOW) < share * _SCALE
