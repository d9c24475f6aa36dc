"""Local Unix sockets the agent serves (the admin socket, the metrics socket): created
private, then opened to one group.

`os.umask` is process-wide, so the window it is narrowed for is kept to the bind itself.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

Server = TypeVar("Server")


def bind_private(path: Path, bind: Callable[[str], Server]) -> Server:
    """`bind(str(path))` with the socket created 0600: a stale socket of an earlier run is
    replaced; anything else at `path` is refused (OSError), never removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket():
        path.unlink()
    elif path.exists() or path.is_symlink():
        raise OSError(f"{path} exists and is not a socket")
    old_umask = os.umask(0o177)
    try:
        return bind(str(path))
    finally:
        os.umask(old_umask)


def open_to_group(path: Path, group: str) -> bool:
    """Mode 0660 with `group`; False (left root-only) when there is no such group. Under
    systemd (Group=portagent) the socket already has the group: no chown then, so the unit
    can forbid the chown syscalls altogether."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return False
    if path.stat().st_gid != gid:
        os.chown(path, -1, gid)
    path.chmod(0o660)
    return True


__all__ = ["bind_private", "open_to_group"]
