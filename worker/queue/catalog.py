"""Portfolios by name, as callers of the task API name them: `cascade/default` is the
process's portfolio (--portfolio or CASCADE_PORTFOLIO); every `*.toml` or `*.yaml`
file of CASCADE_PORTFOLIO_DIR is `cascade/<file stem>`. A submitter (client, task,
API) resolves a name here; the job row stores the portfolio's digest."""
from __future__ import annotations

import difflib
from pathlib import Path

from router.core.errors import PortfolioError
from router.core.portfolio import Portfolio, load_portfolio

PREFIX = "cascade/"
DEFAULT = PREFIX + "default"


class Catalog:
    def __init__(self, default: Portfolio | None = None, directory: Path | None = None):
        self.portfolios: dict[str, Portfolio] = {}
        if directory is not None:
            files = sorted(p for p in Path(directory).iterdir() if p.suffix in (".toml", ".yaml", ".yml"))
            for f in files:
                self.portfolios[PREFIX + f.stem] = load_portfolio(f)
        if default is not None:
            self.portfolios[DEFAULT] = default

    @classmethod
    def from_settings(cls, settings, default: Portfolio | None = None) -> "Catalog":
        if default is None and settings.portfolio:
            default = load_portfolio(settings.portfolio)
        return cls(default, settings.portfolio_dir)

    def names(self) -> list[str]:
        return sorted(self.portfolios)

    def get(self, name: str | None) -> Portfolio:
        """A portfolio by name (None: the default); PortfolioError naming the known ones."""
        name = name or DEFAULT
        p = self.portfolios.get(name) or self.portfolios.get(PREFIX + name)
        if p is None:
            near = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise PortfolioError(f"unknown portfolio {name!r}{hint}; known: {', '.join(self.names()) or 'none'}")
        return p
