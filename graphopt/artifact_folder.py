"""Artifact folders on disk: what a valid one is, and replacing one without losing it.

An artifact folder holds exactly two files, ``manifest.json`` and the library it names.
``save`` only ever replaces a folder that is a graphopt artifact by that definition (or an
empty one): a folder holding anything else, a file, or a symbolic link is refused, since
replacing it would delete what graphopt did not write.

How a save reaches the disk, and what a crash can leave:

1. The library and the manifest are written into a temporary sibling folder
   ``.NAME.graphopt-tmp-XXXXXXXX``, each file fsync'd, then the folder itself.
2. It is renamed onto the destination and the parent folder fsync'd. A new destination
   (or an empty folder) is a single ``rename``. An existing artifact is swapped with it by
   one ``renameat2(RENAME_EXCHANGE)`` (Linux): at every instant, also across a power loss,
   the destination is the old complete artifact or the new complete one, never a mix and
   never missing. The old one, now in the temporary folder, is then deleted.
3. Where the exchange is unavailable (another OS, a filesystem without it) the old artifact
   is renamed aside to ``.NAME.graphopt-old-XXXXXXXX`` and the new one renamed in. A save
   killed between those two renames leaves no destination and the old artifact complete in
   the aside folder.

The next save to the same destination cleans up after a killed one: it removes the
temporary folders of that pattern no live save holds (each save holds an ``flock`` on its
own until it ends; the kernel drops it when the process dies) and puts an aside artifact
back in place when the destination is missing, then replaces it as usual.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from typing import Any, Callable, Iterator

from graphopt.errors import ArtifactError

FORMAT = "graphopt-artifact"
FORMAT_VERSION = 1
LIBRARY = "model.so"
MANIFEST = "manifest.json"

_TMP = ".graphopt-tmp-"
_ASIDE = ".graphopt-old-"
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ manifests
def is_plain_file_name(name: Any) -> bool:
    """A file name inside the artifact folder: no separators, not absolute, not ``.``/``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _tensor_spec_problem(spec: Any) -> str | None:
    if not isinstance(spec, dict):
        return f"is a {type(spec).__name__}, not an object"
    if not isinstance(spec.get("name"), str):
        return "has no string 'name'"
    if not isinstance(spec.get("dtype"), str):
        return "has no string 'dtype'"
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
            isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape):
        return "has no 'shape' list of sizes and dim names"
    return None


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """``manifest`` if it has every key ``load`` reads, each of the right type; else an
    ArtifactError naming the first key that is missing or wrong."""
    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: {MANIFEST} {why}")

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad("is not a graphopt manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{where}: format version {manifest.get('format_version')} is not supported by this "
                            f"graphopt (reads version {FORMAT_VERSION}); rebuild it")
    for key in ("library", "sha256", "inputs", "outputs", "target", "tvm_version"):
        if key not in manifest:
            raise bad(f"has no {key!r}")
    if not is_plain_file_name(manifest["library"]):
        raise bad(f"names library {manifest['library']!r}: it must be a plain file name inside the artifact "
                  "folder (no path separators, not absolute, not '..')")
    if not (isinstance(manifest["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", manifest["sha256"])):
        raise bad("has no valid 'sha256' (64 hex digits)")
    for key in ("tvm_version", "entry", "pipeline", "name"):
        if key in manifest and not isinstance(manifest[key], str):
            raise bad(f"has a {type(manifest[key]).__name__} for {key!r}, not a string")
    for key in ("inputs", "outputs"):
        if not isinstance(manifest[key], list):
            raise bad(f"has a {type(manifest[key]).__name__} for {key!r}, not a list")
        for i, spec in enumerate(manifest[key]):
            problem = _tensor_spec_problem(spec)
            if problem:
                raise bad(f"{key}[{i}] {problem}")
    target = manifest["target"]
    if not (isinstance(target, dict) and isinstance(target.get("tvm"), dict)
            and isinstance(target["tvm"].get("kind"), str)):
        raise bad("has no 'target' with a 'tvm' target dict (with a 'kind')")
    for key in ("host",):
        if target.get(key) is not None and not isinstance(target[key], dict):
            raise bad(f"target {key!r} is a {type(target[key]).__name__}, not a target dict")
    for key in ("name", "cross_triple"):
        if target.get(key) is not None and not isinstance(target[key], str):
            raise bad(f"target {key!r} is a {type(target[key]).__name__}, not a string")
    features = manifest.get("cpu_features")
    if features is not None and not (isinstance(features, list) and all(isinstance(f, str) for f in features)):
        raise bad("has a 'cpu_features' that is not a list of names")
    return manifest


def read_manifest(path: str) -> dict[str, Any]:
    """The checked manifest of the artifact folder ``path``."""
    where = f"artifact {path}"
    if not os.path.isdir(path):
        raise ArtifactError(f"{where}: no such folder")
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{where}: {MANIFEST} is missing (not a graphopt artifact?)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{where}: {MANIFEST} is corrupt ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{where}: cannot read {MANIFEST}: {e.strerror or e}") from None
    return check_manifest(manifest, where)


def checked_library(path: "str | os.PathLike[str]", manifest: dict[str, Any]) -> str:
    """The path of the library of the artifact folder ``path``, after checking that the
    manifest names a plain file there, that it exists and that its SHA-256 is the manifest's."""
    path = os.fspath(path)
    name = manifest.get("library")
    if not is_plain_file_name(name):
        raise ArtifactError(f"artifact {path}: {MANIFEST} names library {name!r}: it must be a plain file name "
                            "inside the artifact folder (no path separators, not absolute, not '..')")
    lib = os.path.join(path, name)
    if not os.path.isfile(lib):
        raise ArtifactError(f"artifact {path}: library {name} is missing")
    if not isinstance(manifest.get("sha256"), str):
        raise ArtifactError(f"artifact {path}: {MANIFEST} has no 'sha256' of {name}")
    if sha256_file(lib) != manifest["sha256"]:
        raise ArtifactError(f"artifact {path}: SHA-256 of {name} does not match the manifest "
                            "(the file was changed or truncated)")
    return lib


def _not_an_artifact(path: str) -> str | None:
    """Why the existing, non-empty folder ``path`` is not one save may replace; None if it is."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, ValueError, UnicodeDecodeError):
        return f"its {MANIFEST} is not readable JSON"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return f"its {MANIFEST} is not a graphopt manifest"
    library = manifest.get("library")
    if not is_plain_file_name(library) or not os.path.isfile(os.path.join(path, library)):
        return f"the library its {MANIFEST} names ({library!r}) is not a file in it"
    others = sorted(set(os.listdir(path)) - {MANIFEST, library})
    if others:
        return f"it holds files graphopt did not write: {', '.join(others[:5])}"
    return None


# ------------------------------------------------------------------------------------- writing
def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _flocked(path: str, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on the folder ``path``; yields False (holding nothing) when
    ``blocking`` is off and another process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the lock


def _check_destination(path: str) -> bool:
    """True when ``path`` holds an artifact to replace, False when there is nothing to keep
    (missing or an empty folder); ArtifactError when saving there would delete something."""
    if os.path.islink(path):
        raise ArtifactError(f"cannot save to {path}: it is a symbolic link; save to the folder it points to")
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise ArtifactError(f"cannot save to {path}: it is a file, not an artifact folder")
    if not os.listdir(path):
        return False
    why = _not_an_artifact(path)
    if why:
        raise ArtifactError(f"{path} exists and is not a graphopt artifact ({why}); refusing to replace it: "
                            "save to a new or an empty folder")
    return True


def _clean_up_killed_saves(path: str) -> None:
    """Remove what saves to ``path`` that were killed left behind (parent lock held)."""
    parent, base = os.path.split(path)
    aside, tmp = (re.compile(rf"\.{re.escape(base)}{re.escape(kind)}[a-z0-9_]+") for kind in (_ASIDE, _TMP))
    for entry in sorted(os.listdir(parent)):
        full = os.path.join(parent, entry)
        if not os.path.isdir(full) or os.path.islink(full):
            continue
        if aside.fullmatch(entry):
            if not os.path.lexists(path):  # killed between its two renames: the old artifact is back
                os.rename(full, path)
            else:
                shutil.rmtree(full, ignore_errors=True)
        elif tmp.fullmatch(entry):
            with _flocked(full, blocking=False) as ours:
                if ours:  # no live save holds it
                    shutil.rmtree(full, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap folders ``a`` and ``b`` in one step (Linux renameat2); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def write_folder_atomically(path: str, write: Callable[[str], None]) -> None:
    """Make ``path`` the folder that ``write(folder)`` fills, as the module docstring describes.

    ``write`` fills an empty temporary folder; the files it leaves there are fsync'd by this
    function. ``path`` must be absolute."""
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        _check_destination(path)  # refuse before the (long) write
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}{_TMP}", dir=parent)
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"cannot write artifact to {path}: {e.strerror or e}") from e
    try:
        with _flocked(tmp):
            write(tmp)
            for name in os.listdir(tmp):
                _fsync(os.path.join(tmp, name))
            _fsync(tmp)
            with _flocked(parent):
                _clean_up_killed_saves(path)
                _swap_into_place(tmp, path)
                _fsync(parent)
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"cannot write artifact to {path}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the old artifact after an exchange; nothing after a rename


def _swap_into_place(tmp: str, path: str) -> None:
    if not _check_destination(path):
        os.replace(tmp, path)  # onto nothing, or onto an empty folder
    elif not _exchange(tmp, path):
        aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{_ASIDE}{secrets.token_hex(4)}")
        os.rename(path, aside)
        os.rename(tmp, path)
        shutil.rmtree(aside, ignore_errors=True)
