"""Build-time check: every module of the installed portagent packages imports.

Run as `python3 -I debian/import-check.py DIST_PACKAGES_DIR` so that only
Debian's own modules (and the tree being packaged) are on the path. `portagent` is
a PEP 420 namespace: the agent's package ships portagent.agent, portagent.wire and
the generated portagent.v1 / portagent.health, and nothing of the broker or the tests.
"""

import importlib
import pkgutil
import sys
from pathlib import Path

root = sys.argv[1]
sys.path.insert(0, root)
import portagent  # noqa: E402

shipped = sorted(
    p.name for p in (Path(root) / "portagent").iterdir() if p.is_dir() and p.name != "__pycache__"
)
if (Path(root) / "portagent" / "__init__.py").exists():
    sys.exit("portagent/__init__.py is shipped: it would hide the other distributions")
if shipped != ["agent", "health", "v1", "wire"]:
    sys.exit(f"portagent/ holds {shipped}, expected agent, health, v1 and wire")
names = []
for sub in shipped:
    package = importlib.import_module(f"portagent.{sub}")
    if not package.__file__.startswith(root):
        sys.exit(f"imported {package.__name__} from {package.__file__}, not from {root}")
    names.append(package.__name__)
    names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
for name in names:
    importlib.import_module(name)
print(f"import-check: {len(names)} modules import from {root}")
