"""One tuner beside each policy it tunes, and the entry points the lab and the CLI use.

    fit(policy_name, train_records, tiers, target, **options) -> Fitted

A policy without a tuner of its own is searched by `grid.GridTuner` when its knobs
are bounded scalars. Every reported train figure is replayed with
`router.lab.simulate` (`confirm`), so the search only chooses knobs.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Callable, Sequence

from threadpoolctl import threadpool_limits

from router.core.errors import InternalError
from router.core.policies import POLICIES, make_policy
from router.core.policy import TierInfo, tier_infos
from router.core.records import Record
from router.lab.labelled import Table, build_table
from router.lab.metrics import summarize
from router.lab.simulate import TierModel, simulate
from router.lab.tuning import Fitted, Target, Tuner, TuningError

from .agreement import AgreementTuner
from .automix import AutoMixTuner
from .cargo import CargoTuner
from .cascade_routing import CascadeRoutingTuner
from .frugalgpt import FrugalGPTTuner
from .gatekeeper import GatekeeperTuner
from .grid import GridTuner
from .hybrid_llm import HybridLLMTuner
from .lm_cascade import LMCascadeTuner
from .logistic_router import LogisticRouterTuner
from .ltt import RiskSpec
from .optllm import OptLLMTuner
from .random_route import RandomTuner
from .rational import RationalTuner
from .routed_threshold import RoutedThresholdTuner
from .routellm import RouteLLMTuner
from .select_then_route import SelectThenRouteTuner
from .single import SingleTuner
from .sweep_ltt import RiskControlledSweep
from .threshold import ThresholdTuner
from .threshold_ltt import RiskControlledThreshold

TUNERS: dict[str, Callable[..., Tuner]] = {
    t.policy: t for t in (ThresholdTuner, SingleTuner, RandomTuner, CascadeRoutingTuner, AutoMixTuner,
                          LogisticRouterTuner, SelectThenRouteTuner, RationalTuner, RouteLLMTuner, HybridLLMTuner,
                          OptLLMTuner, CargoTuner, AgreementTuner, FrugalGPTTuner, GatekeeperTuner, LMCascadeTuner,
                          RoutedThresholdTuner)
}
# policies whose knobs Learn then Test can certify (`risk=RiskSpec(...)` among the tuning options)
RISK_TUNERS: dict[str, Callable[..., Tuner]] = {
    "threshold": RiskControlledThreshold,
    "automix": functools.partial(RiskControlledSweep, policy="automix", learner=AutoMixTuner),
    "cascade-routing": functools.partial(RiskControlledSweep, policy="cascade-routing", learner=CascadeRoutingTuner),
}


def make_tuner(policy: str, table: Table, infos: Sequence[TierInfo], **options: Any) -> Tuner:
    if policy == "auto":  # not a policy of its own: chooses a registered one (.auto)
        from .auto import AutoTuner  # deferred: auto chooses among this registry's tuners, a cycle at the top

        spec = options.pop("risk", None)
        if spec is not None and not isinstance(spec, RiskSpec):
            raise TuningError(f"the risk option takes a RiskSpec, got {type(spec).__name__}")
        return AutoTuner(table, infos, risk=spec, **options)
    if policy not in POLICIES:
        near = difflib.get_close_matches(policy, list(POLICIES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise TuningError(f"unknown policy {policy!r}{hint}; known: auto, {', '.join(POLICIES)}")
    spec = options.pop("risk", None)
    if spec is not None:
        if not isinstance(spec, RiskSpec):
            raise TuningError(f"the risk option takes a RiskSpec, got {type(spec).__name__}")
        if policy not in RISK_TUNERS:
            raise TuningError(f"policy {policy!r} has no risk-controlled tuner; those that have one: "
                              f"{', '.join(RISK_TUNERS)}")
        return RISK_TUNERS[policy](table, infos, risk_spec=spec, **options)
    t = TUNERS.get(policy)
    if t is not None:
        return t(table, infos, **options)
    return GridTuner(table, infos, policy=policy, **options)

def confirm(fitted: Fitted, records: Sequence[Record], tiers: Sequence[TierModel]) -> Fitted:
    """Replay the fitted knobs on the rows they were fitted on with `router.simulate`
    and report simulate's train accuracy and cost (the search's own figures only
    choose knobs). A disagreement is a bug in the search, raised, never hidden."""
    s = summarize(simulate(make_policy(fitted.policy, tier_infos(tiers), fitted.params), tiers, records), tiers)
    if abs(s["accuracy"] - fitted.train_accuracy) > 1e-9 or abs(s["cost"] - fitted.train_cost) > 1e-9 * max(1.0, abs(s["cost"])):
        raise InternalError(
            f"internal error: tuning estimated accuracy {fitted.train_accuracy!r} / cost {fitted.train_cost!r} for "
            f"{fitted.policy} {fitted.params}, router.simulate gives {s['accuracy']!r} / {s['cost']!r}")
    return dataclasses.replace(fitted, train_accuracy=s["accuracy"], train_cost=s["cost"])


def fit(policy: str, train_records: Sequence[Record], tiers: Sequence[TierModel], target: Target,
        **options: Any) -> Fitted:
    """Fit `policy`'s knobs on `train_records` (and nothing else) to `target`; the
    returned train accuracy and cost are replayed with `router.simulate`."""
    if not train_records:
        raise TuningError("no train rows to fit on")
    with threadpool_limits(limits=1):  # small matrices: one BLAS thread (see router.lab.evaluate)
        table = build_table(train_records, tiers)
        return confirm(make_tuner(policy, table, tier_infos(tiers), **options).select(target), train_records, tiers)
