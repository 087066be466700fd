"""Per-checkpoint signatures (cached) and pairwise similarity features for merge selection.

A catalog is read once: one streaming pass over each checkpoint's weights (structural part) and one
batched forward pass of the probes (functional part); every pairwise feature afterwards comes from
the small cached signatures, never from the weights again.
"""

from features.cache import compute_signatures, load_signature, load_signatures
from features.pairwise import pair_features, pairwise_features
from features.schema import DEFAULT_CONFIG, FEATURE_SCHEMA_VERSION, SignatureConfig, feature_names
from features.signature import Signature, SignaturePart

__all__ = [
    "DEFAULT_CONFIG",
    "FEATURE_SCHEMA_VERSION",
    "Signature",
    "SignatureConfig",
    "SignaturePart",
    "compute_signatures",
    "feature_names",
    "load_signature",
    "load_signatures",
    "pair_features",
    "pairwise_features",
]
