"""Build-time check: every module of the installed portagent package imports.

Run as `python3 -I debian/import-check.py DIST_PACKAGES_DIR` so that only
Debian's own modules (and the tree being packaged) are on the path.
"""

import importlib
import pkgutil
import sys

sys.path.insert(0, sys.argv[1])
import portagent  # noqa: E402

if not portagent.__file__.startswith(sys.argv[1]):
    sys.exit(f"imported portagent from {portagent.__file__}, not from {sys.argv[1]}")
names = [m.name for m in pkgutil.walk_packages(portagent.__path__, "portagent.")]
for name in names:
    importlib.import_module(name)
print(f"import-check: {len(names)} modules import from {sys.argv[1]}")
