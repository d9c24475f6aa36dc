"""Build-time check: every module of one binary package imports, from the final layout.

    python3 -I -B debian/import-check.py PART DIST_PACKAGES [DEPENDENCY_DIST_PACKAGES...]

PART is wire, agent, broker or request. `-I` keeps the user's site and PYTHONPATH out, so only
Debian's own modules, the package being checked and the packages it depends on (their
dist-packages trees, e.g. python3-portagent-wire's for the agent) are importable: a
module that needs something no Depends: provides fails here, not on a host.

`portagent` is a PEP 420 namespace across the packages: no package may ship
portagent/__init__.py (it would hide the others), and each ships exactly its own
subpackages: the agent and the broker never each other's, and none the test lab.
Besides portagent/, only the wire package may ship one more top-level tree: google/rpc
(the AIP-193 error-detail messages, generated at their canonical import path).
"""

import importlib
import pkgutil
import sys
from pathlib import Path

# What each binary package's portagent/ holds (subpackages of the namespace).
EXPECTED = {
    "wire": ["health", "v1", "wire"],  # python3-portagent-wire
    "agent": ["agent"],  # portagent
    "broker": ["broker"],  # portagent-broker
    "request": ["request"],  # portagent-request
}
# Top-level trees a package may ship besides portagent/ (and its *.dist-info).
OPTIONAL_TOP = {"wire": {"google": ["rpc"]}, "agent": {}, "broker": {}, "request": {}}
# The requester's client runs on laptops and CI runners with Python's standard library
# only: once all its modules are imported, none of these may have been loaded (they are
# importable here, from Debian's dist-packages, so a stray import would not fail).
FORBIDDEN = {"request": {"grpc", "google", "cryptography", "jwt", "cedarpy", "portagent.wire",
                         "portagent.agent", "portagent.broker"}}

if len(sys.argv) < 3 or sys.argv[1] not in EXPECTED:
    sys.exit(f"usage: import-check.py {{{','.join(EXPECTED)}}} DIST_PACKAGES [DEPENDENCY...]")
part, root, *dependencies = sys.argv[1:]
for path in reversed([root, *dependencies]):
    sys.path.insert(0, path)
namespace = Path(root) / "portagent"
if (namespace / "__init__.py").exists():
    sys.exit(f"{part}: portagent/__init__.py is shipped: it would hide the other packages")


def subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != "__pycache__")


shipped = subdirs(namespace)
if shipped != EXPECTED[part]:
    sys.exit(f"{part}: portagent/ holds {shipped}, expected {EXPECTED[part]}")
top = [name for name in subdirs(Path(root)) if not name.endswith(".dist-info")]
packages = [f"portagent.{sub}" for sub in shipped]
for name in top:
    if name == "portagent":
        continue
    allowed = OPTIONAL_TOP[part].get(name)
    if allowed is None or subdirs(Path(root) / name) != allowed:
        sys.exit(f"{part}: ships {name}/ ({subdirs(Path(root) / name)}): not part of this package")
    packages += [f"{name}.{sub}" for sub in allowed]
# Alembic's migration environment and revisions are scripts Alembic runs with its
# own context (alembic.context.config exists only then): checked by the store's
# tests and by `serve --check`, which migrates a database; here only their package.
SCRIPTS = (".migrations.env", ".migrations.versions.")


def is_script(name: str) -> bool:
    return any(marker in name or name.endswith(marker) for marker in SCRIPTS)


names = []
for qualified in packages:
    package = importlib.import_module(qualified)
    origin = package.__file__ or next(iter(package.__path__), "")
    if not origin.startswith(root):
        sys.exit(f"{part}: imported {package.__name__} from {origin}, not from {root}")
    names.append(package.__name__)
    names += [m.name for m in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
for name in names:
    if not is_script(name):
        importlib.import_module(name)
loaded = {m for m in FORBIDDEN.get(part, ()) if m in sys.modules}
if loaded:
    sys.exit(f"{part}: importing its modules loaded {sorted(loaded)}")
print(f"import-check: {part}: {len(names)} modules import from {root}")
