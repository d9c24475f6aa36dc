"""portagentd's argument parser formats exactly as argparse's default would, without
argparse importing shutil (and bz2 and lzma with it) for the daemon's whole life."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from portagent.agent import daemon


@pytest.mark.parametrize("columns", ["40", "80", "123", "", "junk", "-5"])
def test_help_is_what_argparse_would_print(columns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    ours = daemon.build_parser()
    reference = daemon.build_parser()
    reference.formatter_class = argparse.HelpFormatter
    assert ours.format_help() == reference.format_help()
    assert ours.format_usage() == reference.format_usage()
    assert "--check-config" in ours.format_help()


def test_parsing_arguments_does_not_import_shutil() -> None:
    program = (
        "import sys\n"
        "from portagent.agent import daemon\n"
        "daemon.build_parser().parse_args(['--config', '/nonexistent.toml'])\n"
        "print(sorted(m for m in ('shutil', 'bz2', 'lzma') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"
