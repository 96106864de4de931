"""Similarity losses for registration, each selectable by one name (``build_similarity``).

Every loss is a module ``loss(warped, fixed) -> scalar`` that is smallest for identical inputs and grows with
dissimilarity. Names: ``mse``, ``ncc`` (local NCC, :mod:`.ncc`), ``deepsim-ae`` and ``deepsim-seg`` (DeepSim with a frozen
auto-encoder or segmentation feature net), and the paper's other baselines ``nmi`` (normalised mutual information,
:mod:`.nmi`), ``mind`` (MIND-SSC, :mod:`.mind`) and ``ncc-sup`` (local NCC plus a label term), and ``dice``
(the label term alone, :mod:`.supervised`: SynthMorph's loss on synthetic pairs).
All are 0 for identical inputs except ``nmi``, whose Parzen estimate keeps it above 0 (see its module).

A loss that compares label maps too has a class attribute ``needs_labels = True`` and is called as
``loss(warped, fixed, ddf=..., moving_label=..., fixed_label=...)``; ``RegistrationObjective`` passes these
only to such a loss, so the others keep the two-argument call. A new loss is one class plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from deepsim.losses.deepsim import DeepSimLoss
from deepsim.losses.mind import MINDSSCLoss
from deepsim.losses.mse import MSELoss
from deepsim.losses.ncc import LocalNCCLoss
from deepsim.losses.nmi import NMILoss
from deepsim.losses.supervised import LabelOverlapLoss, NCCSupLoss

__all__ = ["SIMILARITY_NAMES", "FEATURE_NET_OF", "build_similarity"]


def _needs_feature_net(name: str) -> Callable[..., nn.Module]:
    def build(spatial_dims: int, feature_net: nn.Module | None = None, label_values=None, **kwargs) -> nn.Module:
        if feature_net is None:
            raise ValueError(f"similarity {name!r} needs a trained feature net (run its pretraining stage first)")
        return DeepSimLoss(feature_net, **kwargs)

    return build


def _ncc_sup(spatial_dims: int, feature_net: nn.Module | None = None, label_values=None, **kwargs) -> nn.Module:
    if label_values is None:
        raise ValueError("similarity 'ncc-sup' needs label_values (the 'label_values' of the prepared datalist)")
    return NCCSupLoss(label_values, spatial_dims, **kwargs)


def _dice(spatial_dims: int, feature_net: nn.Module | None = None, label_values=None, **kwargs) -> nn.Module:
    if label_values is None:
        raise ValueError("similarity 'dice' needs label_values (the 'label_values' of the prepared datalist)")
    return LabelOverlapLoss(label_values, **kwargs)


# Each builder takes (spatial_dims, feature_net=None, label_values=None, **loss_kwargs) and ignores what it needs not.
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mse": lambda spatial_dims, feature_net=None, label_values=None, **kw: MSELoss(),
    "ncc": lambda spatial_dims, feature_net=None, label_values=None, **kw: LocalNCCLoss(spatial_dims, **kw),
    "deepsim-ae": _needs_feature_net("deepsim-ae"),
    "deepsim-seg": _needs_feature_net("deepsim-seg"),
    "nmi": lambda spatial_dims, feature_net=None, label_values=None, **kw: NMILoss(**kw),
    "mind": lambda spatial_dims, feature_net=None, label_values=None, **kw: MINDSSCLoss(spatial_dims, **kw),
    "ncc-sup": _ncc_sup,
    "dice": _dice,
}
SIMILARITY_NAMES: tuple[str, ...] = tuple(_REGISTRY)

#: Which pretrained feature net each similarity needs ("ae", "seg" or None).
FEATURE_NET_OF: dict[str, str | None] = {
    "mse": None, "ncc": None, "deepsim-ae": "ae", "deepsim-seg": "seg", "nmi": None, "mind": None, "ncc-sup": None,
    "dice": None,
}  # fmt: skip


def build_similarity(
    name: str,
    spatial_dims: int = 3,
    feature_net: nn.Module | None = None,
    label_values: Sequence[int] | None = None,
    **kwargs,
) -> nn.Module:
    """Instantiate the similarity loss called ``name`` (one of ``SIMILARITY_NAMES``).

    ``feature_net`` is used by the DeepSim losses only, ``label_values`` by ``ncc-sup`` only; ``kwargs`` go to the
    loss's constructor.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITY_NAMES)}")
    return _REGISTRY[name](spatial_dims, feature_net=feature_net, label_values=label_values, **kwargs)
