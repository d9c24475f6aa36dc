"""The agent's adapters to the kernel, the journal and the store.

pyroute2's package `__init__` imports all of pyroute2 (IPRoute, NDB, netns, ...): 26 MB
of an idle agent on Debian 12's python3-pyroute2 0.7.2, 9 MB on 0.9, of which the agent
uses only the netlink core and the conntrack and nftables message classes. Before any
adapter imports a pyroute2 submodule, `pyroute2` is registered as its bare package
(its submodules import as usual); the full package `__init__` runs the first time
anything asks the package itself for a name (`from pyroute2 import IPRoute`), so
nothing else in the process is affected. Nothing happens if pyroute2 is already
imported.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def _register_bare_pyroute2() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed: the adapter's own import reports it
    package = types.ModuleType("pyroute2")
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    loader = spec.loader
    loaded = False

    def full_package(name: str) -> Any:
        nonlocal loaded
        if name.startswith("__") or importlib.util.find_spec(f"pyroute2.{name}") is not None:
            # A submodule (`from pyroute2 import config`): the import system loads it.
            raise AttributeError(name)
        if not loaded:
            loaded = True
            del package.__dict__["__getattr__"]
            loader.exec_module(package)  # the real __init__, into this same module
        return getattr(package, name)

    package.__dict__["__getattr__"] = full_package
    sys.modules["pyroute2"] = package


_register_bare_pyroute2()
