"""Atomic output: every artifact is written next to its destination and renamed into place."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import uuid

TMP_MARK = ".kseg-tmp-"


class OutputExistsError(ValueError):
    """The destination exists and force was not given (a ValueError, like every bad-input error)."""


def existing_outputs(path) -> list[str]:
    """`path` itself and its companions (`path.kseg.json`, a checkpoint's `path.index`, ...)."""
    path = os.fspath(path)
    found = [path] if os.path.lexists(path) else []
    return found + sorted(glob.glob(glob.escape(path) + ".*"))


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_output(path, force=False):
    """Yield a temporary path next to `path`; on success rename it (and its companions) into place.

    The temporary name keeps the destination's file name as its tail, so writers that insist
    on a suffix (`.keras`, `.h5`) accept it, and every file the writer creates whose name
    starts with the temporary name (`tmp.index`, `tmp.kseg.json`) is renamed along with it.
    An existing output is refused unless force=True; on any error the temporaries are removed.
    """
    path = os.path.abspath(os.fspath(path))
    existing = existing_outputs(path)
    if existing and not force:
        raise OutputExistsError(f"{path}: output exists ({', '.join(existing)}); use --force (force=True) to overwrite")
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp_base = f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{base}"
    tmp = os.path.join(parent, tmp_base)

    def produced():
        return [n for n in os.listdir(parent) if n.startswith(tmp_base)]

    try:
        yield tmp
        names = produced()
        if not names:
            raise RuntimeError(f"{path}: the writer produced no output")
        if force:
            for old in existing_outputs(path):
                _remove(old)
        # The main artifact last: a reader that finds it also finds its companions.
        for name in sorted(names, key=lambda n: n == tmp_base):
            os.replace(os.path.join(parent, name), os.path.join(parent, base + name[len(tmp_base):]))
    except BaseException:
        for name in produced():
            _remove(os.path.join(parent, name))
        raise
