"""Similarity losses and their registry: one module per family, every name in :mod:`.registry`.

``build_similarity(name, ...)`` builds any of ``SIMILARITY_NAMES``; the classes are importable from here too.
"""

from deepsim.losses.deepsim import DeepSimLoss, cosine_similarity_map, deepsim_similarity
from deepsim.losses.mind import MINDSSCLoss
from deepsim.losses.mse import MSELoss
from deepsim.losses.ncc import LocalNCCLoss, box_mean
from deepsim.losses.nmi import NMILoss
from deepsim.losses.registry import FEATURE_NET_OF, SIMILARITY_NAMES, build_similarity
from deepsim.losses.supervised import NCCSupLoss

__all__ = [
    "FEATURE_NET_OF", "SIMILARITY_NAMES", "build_similarity",
    "DeepSimLoss", "LocalNCCLoss", "MINDSSCLoss", "MSELoss", "NCCSupLoss", "NMILoss",
    "box_mean", "cosine_similarity_map", "deepsim_similarity",
]
