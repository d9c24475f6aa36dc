"""`python -m portagent.request`: the same as the `portagent-request` command."""

from __future__ import annotations

import sys

from portagent.request.cli import main

if __name__ == "__main__":
    sys.exit(main())
