"""Where cedarpy comes from.

cedarpy is not packaged by Debian, so the broker's .deb carries its own copy under
VENDOR_DIR (packaging/build-deb.sh). A pip install (the venv, a wheel) has it on
sys.path already. The directory is added for this process only, never through a .pth
file that would put it under every Python program on the host.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

VENDOR_DIR = Path("/usr/lib/portagent-broker/vendor")


def cedarpy() -> ModuleType:
    """The cedarpy module; ImportError names what to install when it is missing."""
    try:
        return importlib.import_module("cedarpy")
    except ImportError:
        if VENDOR_DIR.is_dir() and str(VENDOR_DIR) not in sys.path:
            sys.path.append(str(VENDOR_DIR))
            try:
                return importlib.import_module("cedarpy")
            except ImportError:
                pass
        raise ImportError(
            "the policy engine needs cedarpy (pip install 'cedarpy>=4.12,<5'; the "
            f"portagent-broker .deb ships it in {VENDOR_DIR})"
        ) from None
