"""Fast checks of the files the Debian package ships (no root, no build): they stay in
step with the code they describe. The full build-install-boot test is test_deb.py."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from portagent.agent import cli, daemon
from portagent.agent.settings import Settings, load_settings
from portagent.broker import cli as broker_cli
from portagent.request import cli as request_cli
from portagent.wire.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
AGENT_TOML = REPO / "packaging" / "agent.toml"
UNIT = REPO / "systemd" / "portagent.service"
MAN = REPO / "packaging" / "man"


def unit_settings() -> list[tuple[str, str]]:
    pairs = []
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def uncommented(text: str) -> str:
    """The shipped agent.toml with every commented setting and table turned on."""
    text = re.sub(r"^#([a-z_\[])", r"\1", text, flags=re.MULTILINE)
    return text.replace("BASE64...", "A" * 43 + "=")


def test_shipped_config_is_refused_until_filled_in() -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(AGENT_TOML.read_text())
    assert all(problem.endswith(": required") for problem in refused.value.problems)


def test_shipped_config_uncommented_is_valid_and_matches_the_defaults() -> None:
    settings = load_settings(uncommented(AGENT_TOML.read_text()))
    defaults = {f: Settings.__dataclass_fields__[f].default
                for f in ("state_dir", "admin_socket", "admin_group", "refuse_action",
                          "reconcile_interval")}
    assert {f: getattr(settings, f) for f in defaults} == defaults
    assert str(settings.api.key_file).startswith("/etc/portagent/tls/")


def test_unit_is_the_one_described() -> None:
    pairs = unit_settings()
    values = dict(pairs)
    assert values["Type"] == "notify"
    assert values["ExecStart"].startswith("/usr/sbin/portagentd --config /etc/portagent/")
    # The main process checks everything and exits 78: RestartPreventExitStatus= covers
    # it, where an ExecStartPre= check would be retried until the start limit.
    assert "ExecStartPre" not in values
    assert values["RestartPreventExitStatus"] == "78"
    assert values["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert values["RestrictAddressFamilies"].split() == [
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert values["Restart"] == "on-failure"
    assert "WatchdogSec" in values and "ExecReload" in values
    # The watchdog test hook is set only by the test's own drop-in.
    assert not any(key == "Environment" for key, _ in pairs)
    assert "PORTAGENT_TEST" not in UNIT.read_text()
    # The admin socket's group comes from the service's group (see the ADR).
    assert values["Group"] == load_settings(uncommented(AGENT_TOML.read_text())).admin_group


def test_versions_agree() -> None:
    upstream = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    debian = (REPO / "packaging" / "debian" / "changelog").read_text().split("\n", 1)[0]
    assert re.match(rf"portagent \({re.escape(upstream)}-\d+\) ", debian), debian
    releases = re.findall(r"^## \[(\d[^\]]*)\]", (REPO / "CHANGELOG.md").read_text(), re.M)
    assert releases[0] == upstream


def options_of(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        found.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= options_of(sub)
    return found


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for name in action.choices}


@pytest.mark.parametrize(("page", "parser"), [
    ("portagentd.8.scd", daemon.build_parser()),
    ("portagent.1.scd", cli.build_parser()),
    ("portagent-broker.1.scd", broker_cli.build_parser()),
])
def test_man_pages_document_every_option(page: str, parser: argparse.ArgumentParser) -> None:
    text = (MAN / page).read_text()
    missing = {o for o in options_of(parser) if f"*{o}*" not in text}
    missing |= {c for c in subcommands(parser) if f"*{c}*" not in text}
    # An option with fixed choices (-o table|json, --protocol tcp|udp) lists them all.
    missing |= {f"{o} {c}" for o, c in option_choices(parser).items() if c not in text}
    assert not missing, f"{page} does not document {sorted(missing)}"


def option_choices(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option with fixed choices, and the choices as a man page writes them (a|b)."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if action.option_strings and action.choices is not None:
            found[action.option_strings[-1]] = "|".join(map(str, action.choices))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_choices(sub)
    return found


@pytest.mark.parametrize(("script", "parser"), [
    ("portagent", cli.build_parser()),
    ("portagent-broker", broker_cli.build_parser()),
])
def test_bash_completion_knows_every_command_and_option(
        script: str, parser: argparse.ArgumentParser) -> None:
    text = (REPO / "packaging" / "bash-completion" / script).read_text()
    commands = re.search(r'local commands="([^"]*)"', text)
    assert commands and set(commands.group(1).split()) == subcommands(parser)
    for option in options_of(parser):
        assert option in text, option


def test_request_man_page_and_completion_know_every_option() -> None:
    # The client reads its options from one table (no argparse on its fast path).
    options = set(request_cli.OPTIONS)
    page = (MAN / "portagent-request.1.scd").read_text()
    assert not {o for o in options if f"*{o}*" not in page}
    assert "*--oidc* github|buildkite|auto" in page
    completion = (REPO / "packaging" / "bash-completion" / "portagent-request").read_text()
    assert not {o for o in options if o not in completion}
    assert "github buildkite auto" in completion


def packaged(path: str) -> set[str]:
    """Source paths a debian/*.install or *.manpages file names (first word of a line)."""
    lines = (REPO / "packaging" / "debian" / path).read_text().splitlines()
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def test_each_binary_package_ships_its_man_page_and_completion() -> None:
    # The broker's files go in the broker's package, the agent's in the agent's.
    assert "debian/build-man/portagent-broker.1" in packaged("portagent-broker.manpages")
    assert "packaging/bash-completion/portagent-broker" in packaged("portagent-broker.install")
    assert packaged("portagent.manpages") == {"debian/build-man/portagent.1",
                                              "debian/build-man/portagentd.8"}
    assert not any("broker" in p for p in packaged("portagent.install"))
    assert packaged("portagent-request.manpages") == {"debian/build-man/portagent-request.1"}
    assert packaged("portagent-request.install") == {
        "packaging/bash-completion/portagent-request"}
    # The example policy the broker's package installs is the one the docs describe.
    assert "packaging/policy.cedar" in packaged("portagent-broker.install")
    for example in packaged("portagent-request.examples"):
        assert (REPO / example).is_dir(), f"{example} is shipped as an example but missing"
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    for page in MAN.glob("*.scd"):
        assert f"packaging/man/{page.name}" in rules, f"{page.name} is never rendered"


@pytest.mark.parametrize("page", sorted((REPO / "packaging" / "man").glob("*.scd")), ids=str)
def test_man_page_compiles_with_scdoc(page: Path) -> None:
    """The .deb build runs scdoc on every page; a page it refuses breaks `make deb`
    (a line starting with "-" is a list item to scdoc, nested * is refused)."""
    import subprocess

    result = subprocess.run(
        ["scdoc"], input=page.read_bytes(), capture_output=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(b".\\\" Generated by scdoc"), result.stdout[:80]
