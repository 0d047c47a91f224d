"""Model builders, one module per family; importing this package registers them all.

Every public module here is imported, so a new family registers by existing.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
