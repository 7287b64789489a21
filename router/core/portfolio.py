"""The portfolio: the ladder of model tiers and the policy that climbs it.

A portfolio is read from TOML or YAML and validated here; every error names the
file and the field (and, for a typo, the field it probably meant). Backend
options are kept as given: the execution layer checks them against the backend.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import PolicyError, PolicyFileError, PortfolioError
from .policies import make_policy
from .policy import Policy, tier_infos
from .policyfile import read_policy_file

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    per_call: float = Field(0.0, ge=0)

    def cost(self, tokens_in: int | None, tokens_out: int | None) -> float:
        return (
            (tokens_in or 0) * self.input_per_mtok / 1e6
            + (tokens_out or 0) * self.output_per_mtok / 1e6
            + self.per_call
        )

    @property
    def is_free(self) -> bool:
        return not (self.input_per_mtok or self.output_per_mtok or self.per_call)


class BackendSpec(BaseModel):
    # Options vary by backend kind; the worker's backend validates them.
    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]*$")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Tier(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    queue: str | None = Field(None, pattern=NAME_PATTERN)
    backend: BackendSpec
    price: Price = Price()
    # Sugar for the threshold policy (this tier accepts when its signal >= threshold);
    # moved into policy.params.thresholds while parsing.
    threshold: float | None = None

    @property
    def queue_name(self) -> str:
        return self.queue or f"cascade.{self.name}"


class PolicySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Portfolio(_Strict):
    tiers: tuple[Tier, ...] = Field(min_length=1)
    policy: PolicySpec

    @field_validator("tiers")
    @classmethod
    def _unique(cls, tiers: tuple[Tier, ...]) -> tuple[Tier, ...]:
        seen: set[str] = set()
        queues: set[str] = set()
        for t in tiers:
            if t.name in seen:
                raise ValueError(f"tier name {t.name!r} is used twice")
            if t.queue_name in queues:
                raise ValueError(f"queue {t.queue_name!r} is used by two tiers")
            seen.add(t.name)
            queues.add(t.queue_name)
        return tiers

    @model_validator(mode="after")
    def _policy_fits(self) -> "Portfolio":
        self.built_policy  # raises PolicyError naming the problem
        return self

    @cached_property
    def built_policy(self) -> Policy:
        """The portfolio's policy object, built once (policies are immutable once built)."""
        return make_policy(self.policy.name, tier_infos(self.tiers), dict(self.policy.params))

    @property
    def tier_names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def tier(self, name: str) -> Tier:
        for t in self.tiers:
            if t.name == name:
                return t
        near = difflib.get_close_matches(name, self.tier_names, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise PortfolioError(f"unknown tier {name!r}{hint}; tiers: {', '.join(self.tier_names)}")

    def index(self, name: str) -> int:
        return self.tier_names.index(self.tier(name).name)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @cached_property
    def digest(self) -> str:
        """Content hash: jobs pin the exact portfolio they were submitted with (once per
        portfolio: a batch asks for it per job, and the hash is half a submitter's CPU)."""
        blob = json.dumps(self.spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Option keys whose values are paths, resolved against the portfolio file's folder.
_PATH_KEYS = ("file", "path", "model_path")


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    for tier in raw.get("tiers") or []:
        backend = tier.get("backend") if isinstance(tier, dict) else None
        if not isinstance(backend, dict):
            continue
        for key in _PATH_KEYS:
            v = backend.get(key)
            if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                backend[key] = str((base / v).resolve())


def _policy_from_raw(raw: dict[str, Any], base: Path, where: str) -> None:
    """`[policy]` holds either name + params inline, or `file` = a tuned policy file."""
    pol = raw.get("policy")
    if not isinstance(pol, dict):
        return
    if "file" in pol:
        extra = set(pol) - {"file"}
        if extra:
            raise PortfolioError(f"{where}: policy: with 'file' no other keys are allowed, got {sorted(extra)}")
        p = Path(pol["file"]).expanduser()
        p = p if p.is_absolute() else base / p
        try:
            tuned = read_policy_file(p)
        except PolicyFileError as e:
            raise PortfolioError(f"{where}: policy.file: {e}") from None
        raw["policy"] = {"name": tuned.name, "params": tuned.params}
        return
    params = dict(pol.get("params") or {})
    for k in list(pol):
        if k not in ("name", "params"):
            params[k] = pol.pop(k)
    pol["params"] = params
    # tier-level `threshold` sugar -> params.thresholds
    # (popped, so the stored spec holds each threshold once and re-parses cleanly)
    ths = {t.get("name"): t.pop("threshold") for t in raw.get("tiers") or [] if isinstance(t, dict) and t.get("threshold") is not None}
    if ths:
        given = params.setdefault("thresholds", {})
        clash = set(given) & set(ths)
        if clash:
            raise PortfolioError(f"{where}: threshold for tier(s) {sorted(clash)} given both in the tier and in policy.thresholds")
        given.update(ths)


def _format_validation(e: ValidationError, where: str, raw: Any) -> str:
    lines = []
    for err in e.errors():
        loc = err["loc"]
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            field = loc[-1]
            known = _known_fields(loc[:-1], raw)
            near = difflib.get_close_matches(str(field), known, n=1)
            msg = f"unknown field {field!r}" + (f" (did you mean {near[0]!r}?)" if near else f"; known: {', '.join(known)}")
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{where}: {path or '(top level)'}: {msg}")
    return "\n".join(lines)


def _known_fields(loc: tuple, raw: Any) -> list[str]:
    model: type[BaseModel] = Portfolio
    for part in loc:
        if isinstance(part, int):
            continue
        ann = model.model_fields[part].annotation
        for cand in (Tier, Price, PolicySpec, BackendSpec):
            if cand is ann or cand in getattr(ann, "__args__", ()):
                model = cand
                break
    return list(model.model_fields)


def parse_portfolio(raw: Any, *, base: Path = Path("."), where: str = "portfolio") -> Portfolio:
    if not isinstance(raw, dict):
        raise PortfolioError(f"{where}: expected a table/mapping at the top level")
    raw = json.loads(json.dumps(raw))  # deep copy, plain types
    _resolve_paths(raw, base)
    _policy_from_raw(raw, base, where)
    try:
        return Portfolio.model_validate(raw)
    except ValidationError as e:
        raise PortfolioError(_format_validation(e, where, raw)) from None
    except PolicyError as e:
        raise PortfolioError(f"{where}: policy: {e}") from None


def load_portfolio(path: str | Path) -> Portfolio:
    p = Path(path).expanduser()
    if not p.exists():
        raise PortfolioError(f"portfolio file {str(p)!r} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        elif p.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise PortfolioError(f"portfolio file {str(p)!r}: use .toml, .yaml/.yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise PortfolioError(f"{p}: not valid {p.suffix[1:].upper()}: {e}") from None
    except yaml.YAMLError as e:
        raise PortfolioError(f"{p}: not valid YAML: {e}") from None
    return parse_portfolio(raw, base=p.parent.resolve(), where=str(p))


def portfolio_from_spec(spec: dict[str, Any]) -> Portfolio:
    """Rebuild a stored portfolio (paths already absolute, policy inline)."""
    return parse_portfolio(spec, where="stored portfolio")
