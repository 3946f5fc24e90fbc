"""Saving an artifact never deletes what graphopt did not write, and never loses the artifact.

Specification (graphopt/artifact_folder.py):

* ``save`` writes a new folder, fills an empty one, or replaces a graphopt artifact (a
  manifest with graphopt's format marker, the library it names, nothing else). Anything else
  at the destination (a user's files, a stray manifest.json, an artifact the user added
  files to, a plain file, a symbolic link) is refused with an ArtifactError and left as it
  was. Sibling folders (``out.old``) are never touched.
* A save killed at any point (SIGKILL: no cleanup handler runs) leaves the destination
  holding the old complete artifact or the new complete one; the next save to the same
  destination removes what the killed one left behind.
* A save never leaves temporary folders behind when it ends normally.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError
from graphopt.testing import assert_matches_eager


def _linear(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3).eval()


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models():
    """Two different small models, compiled: what "old" and "new" artifacts hold."""
    old, new = _linear(1), _linear(2)
    return (old, graphopt.compile(old, "x86", (X,), pipeline="fold")), (new, graphopt.compile(new, "x86", (X,),
                                                                                              pipeline="fold"))


def _snapshot(folder) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


# ------------------------------------------------------------------------------ what is replaced
def test_replacing_an_artifact_leaves_only_the_new_one(models, tmp_path):
    (old_model, old), (new_model, new) = models
    out = str(tmp_path / "out")
    old.save(out)
    assert_matches_eager(graphopt.load(out)(X), old_model, (X,))
    new.save(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup folder left
    assert sorted(os.listdir(out)) == ["manifest.json", "model.so"]
    assert_matches_eager(graphopt.load(out)(X), new_model, (X,))


def test_an_empty_folder_is_filled(models, tmp_path):
    (model, module), _ = models
    out = tmp_path / "empty"
    out.mkdir()
    module.save(str(out))
    assert_matches_eager(graphopt.load(str(out))(X), model, (X,))


def test_a_sibling_named_like_a_backup_is_not_touched(models, tmp_path):
    (_, old), (_, new) = models
    out = str(tmp_path / "out")
    backup = tmp_path / "out.old"
    backup.mkdir()
    (backup / "mine.txt").write_text("the user's")
    old.save(out)
    new.save(out)
    assert (backup / "mine.txt").read_text() == "the user's"


def _users_folder(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def _stray_manifest(tmp_path):
    # a file named manifest.json with graphopt's format marker, but no library: not proof
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "graphopt-artifact", "library": "model.so"}))
    return folder


def _foreign_manifest(tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"name": "a web app"}))
    (folder / "model.so").write_bytes(b"not ours")
    return folder


def _artifact_with_user_files(tmp_path, models):
    folder = tmp_path / "precious"
    models[0][1].save(str(folder))
    (folder / "README.md").write_text("my notes on this model")
    return folder


def _library_outside(tmp_path):
    # the manifest names a library outside the folder: replacing must not follow it
    (tmp_path / "elsewhere.so").write_bytes(b"the user's library")
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "graphopt-artifact",
                                                      "library": "../elsewhere.so"}))
    return folder


@pytest.mark.parametrize("make,why", [
    (lambda t, m: _users_folder(t), r"it has no manifest\.json"),
    (lambda t, m: _stray_manifest(t), r"the library its manifest\.json names \('model\.so'\) is not a file in it"),
    (lambda t, m: _foreign_manifest(t), r"its manifest\.json is not a graphopt manifest"),
    (lambda t, m: _artifact_with_user_files(t, m), r"it holds files graphopt did not write: README\.md"),
    (lambda t, m: _library_outside(t), r"the library its manifest\.json names \('\.\./elsewhere\.so'\)"),
], ids=["users_folder", "stray_manifest", "foreign_manifest", "artifact_with_user_files", "library_outside"])
def test_a_folder_that_is_not_a_graphopt_artifact_is_refused_and_kept(models, tmp_path, make, why):
    folder = make(tmp_path, models)
    before = _snapshot(tmp_path)
    with pytest.raises(ArtifactError, match=r"precious exists and is not a graphopt artifact \(" + why):
        models[1][1].save(str(folder))
    assert _snapshot(tmp_path) == before  # not a byte changed, nothing added next to it


def test_a_file_and_a_symlink_are_refused(models, tmp_path):
    module = models[0][1]
    (tmp_path / "a_file").write_text("data")
    with pytest.raises(ArtifactError, match="it is a file, not an artifact folder"):
        module.save(str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "data"
    module.save(str(tmp_path / "real"))
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ArtifactError, match="it is a symbolic link"):
        module.save(str(tmp_path / "link"))
    assert os.path.islink(tmp_path / "link")


# ------------------------------------------------------------------------------ killed saves
# The child compiles the "new" model (_linear(2)), saves it over the "old" artifact at OUT, and is
# SIGKILLed at one point of the save: the step named STAGE prints "stopped" and sleeps until the kill.
_KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    import torch
    import graphopt
    from graphopt import artifact_folder as folder

    out, stage = sys.argv[1:3]

    def stop():
        print("stopped", flush=True)
        time.sleep(600)

    torch.manual_seed(2)
    module = graphopt.compile(torch.nn.Linear(4, 3).eval(), "x86", (torch.randn(2, 4),), pipeline="fold")
    if stage == "writing":  # the library is written, the manifest not yet
        export = module.executable.export_library

        class Slow:
            def export_library(self, path, **kwargs):
                export(path, **kwargs)
                stop()

        module.executable = Slow()
    elif stage == "swapped":  # the new artifact is in place, the old one not yet removed
        swap = folder._swap_into_place
        folder._swap_into_place = lambda tmp, path: (swap(tmp, path), stop())
    elif stage == "aside":  # no RENAME_EXCHANGE: the old artifact renamed aside, the new one not in yet
        folder._exchange = lambda a, b: False
        rename = os.rename

        def rename_then_stop(a, b):
            rename(a, b)
            if ".graphopt-old-" in os.fspath(b):
                stop()

        folder.os.rename = rename_then_stop
    module.save(out)
""")


def _start_save(stage: str, out: str) -> subprocess.Popen:
    """The child's save, stopped at ``stage``."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, out, stage], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "stopped":
        proc.kill()
        raise AssertionError(f"the saving child did not reach {stage!r}:\n{proc.communicate(timeout=60)[1]}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("stage,holds", [("writing", "old"), ("swapped", "new"), ("aside", "none")])
def test_a_save_killed_midway_leaves_a_complete_artifact_and_the_next_save_cleans_up(models, tmp_path, stage,
                                                                                      holds):
    (old_model, old), (new_model, new) = models
    work = tmp_path / "work"
    out = str(work / "out")
    old.save(out)
    _kill(_start_save(stage, out))

    leftovers = sorted(e for e in os.listdir(work) if e != "out")
    assert leftovers and all(e.startswith(".out.graphopt-") for e in leftovers), leftovers
    if holds == "none":
        # documented: without RENAME_EXCHANGE the old artifact waits, complete, in the aside folder
        assert not os.path.exists(out)
        (aside,) = [e for e in leftovers if ".graphopt-old-" in e]
        assert_matches_eager(graphopt.load(str(work / aside))(X), old_model, (X,))
    else:
        assert_matches_eager(graphopt.load(out)(X), old_model if holds == "old" else new_model, (X,))

    new.save(out)  # the next save: removes what the killed one left
    assert sorted(os.listdir(work)) == ["out"]
    assert_matches_eager(graphopt.load(out)(X), new_model, (X,))


def test_the_next_save_does_not_remove_a_save_in_progress(models, tmp_path):
    """Cleaning up is for saves that were killed: a live save's temporary folder stays."""
    (_, old), (new_model, new) = models
    out = str(tmp_path / "work" / "out")
    old.save(out)
    proc = _start_save("writing", out)
    try:
        (busy,) = [e for e in os.listdir(tmp_path / "work") if e != "out"]
        new.save(out)
        assert os.path.isdir(tmp_path / "work" / busy)  # still held by the live save
        assert os.path.exists(tmp_path / "work" / busy / "model.so")
    finally:
        _kill(proc)
    new.save(out)  # the killed save's lock died with it: now its folder goes
    assert sorted(os.listdir(tmp_path / "work")) == ["out"]
    assert_matches_eager(graphopt.load(out)(X), new_model, (X,))
