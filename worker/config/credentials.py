"""Secrets: where credentials come from, and the one place they are blanked out.

Credentials are never written in a portfolio or a URL setting as they are: a
value says `${NAME}` and the process that needs it (a tier worker calling a
model, a process connecting to the broker or the database) expands it from its
environment or from the secrets file named by CASCADE_SECRETS_FILE (KEY=VALUE
lines, e.g. a mounted Docker or Kubernetes secret). The reference is what gets
stored, so the stored portfolio, every attempt and every result line carry the
name of the secret, not the secret.

A literal credential that is written anyway (a password in `base_url`, a key in
its query string, a header value) is blanked by `redact_*` in everything stored,
printed or logged.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from router.core.errors import UserError

MASK = "***"
SECRETS_FILE_ENV = "CASCADE_SECRETS_FILE"
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# query parameters and option names that carry a credential
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_SECRET_WORDS = re.compile(r"(key|token|secret|passw|pwd|auth|sig|credential|session)", re.I)


class SecretError(UserError):
    """A ${NAME} reference with no value in the environment or the secrets file."""


def _file_values() -> dict[str, str]:
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        return {}
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SecretError(f"{SECRETS_FILE_ENV}={path}: cannot read the secrets file ({e.strerror})") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip():
            raise SecretError(f"{p.name}: line {n}: expected NAME=VALUE")  # never echo the line: it is a secret
        out[name.strip()] = value.strip().strip('"').strip("'")
    return out


def secret(name: str, where: str = "") -> str:
    """The value of a secret: the environment first, then the secrets file."""
    value = os.environ.get(name)
    if value is None:
        value = _file_values().get(name)
    if not value:
        raise SecretError(f"{where + ': ' if where else ''}the secret {name} is set neither in the environment "
                          f"nor in the secrets file (${SECRETS_FILE_ENV})")
    return value


def expand(text: str, where: str = "") -> str:
    """`${NAME}` references replaced by their secrets."""
    return _REF.sub(lambda m: secret(m.group(1), where), text)


def redact_url(url: str) -> str:
    """A URL without its credentials: user and password, and query parameters whose
    names say they carry one (key=, api_key=, token=, sig=, ...). ${NAME} stays."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{_mask_literal(userinfo)}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, _mask_literal(v) if _SECRET_WORDS.search(k) else v) for k, v in pairs], safe="${}*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _mask_literal(value: str) -> str:
    """A value made only of ${NAME} references names its secrets and is kept; any
    literal text in it is masked."""
    if _REF.sub("", value).replace(":", "") == "" and _REF.search(value):
        return value
    return MASK


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every URL in it redacted."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's options as they may be stored: base_url without credentials,
    header values masked unless they only reference secrets, and any option whose
    name says it is a credential masked (`api_key_env`, a variable's name, stays)."""
    out: dict[str, Any] = {}
    for k, v in options.items():
        if k == "headers" and isinstance(v, Mapping):
            out[k] = {h: _mask_literal(x) if isinstance(x, str) else MASK for h, x in v.items()}
        elif isinstance(v, str) and k.endswith("url"):
            out[k] = redact_url(v)
        elif _SECRET_WORDS.search(k) and not k.endswith("_env") and v is not None \
                and not isinstance(v, (bool, int, float)):
            # a number is never a credential: `max_tokens` names a count, not a token
            out[k] = _mask_literal(v) if isinstance(v, str) else MASK
        else:
            out[k] = v
    return out


def redact_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A portfolio's spec as stored: every tier's backend options redacted."""
    out = dict(spec)
    tiers = []
    for tier in spec.get("tiers") or []:
        tier = dict(tier)
        backend = dict(tier.get("backend") or {})
        kind = backend.pop("kind", None)
        tier["backend"] = {"kind": kind, **redact_options(backend)} if kind is not None else redact_options(backend)
        tiers.append(tier)
    if tiers:
        out["tiers"] = tiers
    return out


def is_redacted(value: Any) -> bool:
    """Whether a stored value had a credential blanked (it cannot be used to call)."""
    if isinstance(value, str):
        return MASK in value
    if isinstance(value, Mapping):
        return any(is_redacted(v) for v in value.values())
    return False
