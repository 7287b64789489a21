"""Policy registry: name -> class. The portfolio names a policy; this builds it."""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from ..policy import Policy, PolicyError, TierInfo
from .automix import AutoMix
from .cascade_routing import CascadeRouting
from .precall_router import PrecallRouter
from .random_route import RandomRouting
from .select_then_route import SelectThenRoute
from .single import SingleModel
from .threshold import ThresholdCascade

if TYPE_CHECKING:
    from ..portfolio import Portfolio

POLICIES: dict[str, type[Policy]] = {
    ThresholdCascade.name: ThresholdCascade,
    SingleModel.name: SingleModel,
    RandomRouting.name: RandomRouting,
    CascadeRouting.name: CascadeRouting,
    AutoMix.name: AutoMix,
    PrecallRouter.name: PrecallRouter,
    SelectThenRoute.name: SelectThenRoute,
}

__all__ = ["POLICIES", "PolicyError", "build_policy", "make_policy", "tier_infos"]


def tier_infos(portfolio: "Portfolio") -> list[TierInfo]:
    return [
        TierInfo(t.name, i, t.price.input_per_mtok, t.price.output_per_mtok, t.price.per_call)
        for i, t in enumerate(portfolio.tiers)
    ]


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


def build_policy(portfolio: "Portfolio") -> Policy:
    return make_policy(portfolio.policy.name, tier_infos(portfolio), dict(portfolio.policy.params))
