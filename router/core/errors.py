"""One error hierarchy for the whole project.

- `CascadeError`: the root; catch it to catch anything this project raises on purpose.
- `UserError`: the user's input is at fault (a file, a field, an option, a request).
  The CLI prints its message on one line and exits 2; the API answers 4xx. Its
  message names the problem (file, line, field) and, where one is likely, the fix.
- Anything else that escapes, a bare `ValueError` included, is a defect: the CLI
  reports it as a bug, with the traceback, never as the user's fault.

`UserError` is also a `ValueError` so that pydantic validators and callers that
guard with `except ValueError` keep treating it as bad input.
"""
from __future__ import annotations


class CascadeError(Exception):
    """Root of every error this project raises on purpose."""


class UserError(CascadeError, ValueError):
    """Bad input from the user; the message says what and where."""


class PortfolioError(UserError):
    """A portfolio file or stored spec that cannot be used."""


class PolicyError(UserError):
    """A policy name or parameter that cannot be used."""


class RecordsError(UserError):
    """Labelled traffic (the benchmarks format) that cannot be read."""


class PolicyFileError(UserError):
    """A tuned-policy file that cannot be read."""


class InternalError(CascadeError):
    """A broken invariant inside the project (a bug), detected and named."""
