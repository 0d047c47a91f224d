"""Package attributes that load their module on first use (PEP 562).

A feature package (kseg.train, kseg.inference, kseg.serving, convert) lists its public names
and the module each lives in; `import kseg.train` then costs nothing, and only the first use
of a name imports its module (and TensorFlow). The `kseg` command's parsers rely on this: its
subcommand modules sit in these packages and must load without TensorFlow.

    __getattr__, __dir__ = exports(__name__, {"train": "kseg.train.fit", "FusedSGD": "kseg.train.optim"})

A public name must not also be a submodule's name: importing the submodule would set the
package attribute to the module.
"""

from __future__ import annotations

import importlib


def exports(package: str, names: dict[str, str]):
    """(__getattr__, __dir__) for `package`: names[attr] is the module defining attr."""

    def __getattr__(attr):
        if attr in names:
            value = getattr(importlib.import_module(names[attr]), attr)
            setattr(importlib.import_module(package), attr, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {attr!r}")

    def __dir__():
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
