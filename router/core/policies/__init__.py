"""Policy registry: name -> class. The portfolio names a policy; this builds it."""
from __future__ import annotations

import difflib
from typing import Any

from ..errors import PolicyError
from ..policy import Policy, TierInfo
from .agreement import AgreementCascade
from .automix import AutoMix
from .cargo import Cargo
from .cascade_routing import CascadeRouting
from .every_tier import EveryTier
from .frugalgpt import FrugalGPT
from .gatekeeper import Gatekeeper
from .hybrid_llm import HybridLLM
from .lm_cascade import LMCascade
from .logistic_router import LogisticRouter
from .optllm import OptLLM
from .random_route import RandomRouting
from .rational import RationalCascade
from .routed_threshold import RoutedThreshold
from .routellm import RouteLLM
from .select_then_route import SelectThenRoute
from .single import SingleModel
from .threshold import ThresholdCascade

POLICIES: dict[str, type[Policy]] = {
    ThresholdCascade.name: ThresholdCascade,
    SingleModel.name: SingleModel,
    RandomRouting.name: RandomRouting,
    CascadeRouting.name: CascadeRouting,
    AutoMix.name: AutoMix,
    LogisticRouter.name: LogisticRouter,
    SelectThenRoute.name: SelectThenRoute,
    RationalCascade.name: RationalCascade,
    RouteLLM.name: RouteLLM,
    HybridLLM.name: HybridLLM,
    OptLLM.name: OptLLM,
    Cargo.name: Cargo,
    AgreementCascade.name: AgreementCascade,
    FrugalGPT.name: FrugalGPT,
    Gatekeeper.name: Gatekeeper,
    LMCascade.name: LMCascade,
    EveryTier.name: EveryTier,
    RoutedThreshold.name: RoutedThreshold,
}

__all__ = ["POLICIES", "make_policy"]


def make_policy(name: str, tiers: list[TierInfo], params: dict[str, Any]) -> Policy:
    cls = POLICIES.get(name)
    if cls is None:
        near = difflib.get_close_matches(name, list(POLICIES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PolicyError(f"unknown policy {name!r}{hint}; known: {', '.join(POLICIES)}")
    try:
        return cls(tiers, **params)
    except TypeError as e:
        # an unknown or missing parameter: name it instead of a Python traceback
        raise PolicyError(f"policy {name!r}: {e}".replace("__init__() ", "")) from None
