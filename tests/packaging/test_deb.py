"""The agent's Debian packages (portagent + python3-portagent-wire) under a real
systemd: install, enforce, journald, reload, restart, upgrade, watchdog, hardening
score, stop and purge. The broker's package: test_broker_deb.py.

The tests share one booted container and run in file order: each step starts from
the state the previous one left (one grant, active for the whole run).
`make test-packaging` runs them; see tests/packaging/conftest.py for the harness.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from pkglab import (
    AGENT,
    ARCHITECTURE,
    GUARDED_PORT,
    HOST_ID,
    PACKAGES,
    REPO,
    WIRE,
    PackagingLab,
    wait_for,
)

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

EXPOSURE_TARGET = 2.0
# A shorter watchdog for the stall test only (a runtime drop-in the test writes).
WATCHDOG_DROPIN = "/run/systemd/system/portagent.service.d/50-test-watchdog.conf"

# Shared between the steps: the grant that must survive everything.
state: dict[str, str] = {}


def test_debs_build_and_lintian_is_clean(built_debs: tuple[dict[str, Path], str]) -> None:
    debs, lintian = built_debs
    assert {p: d.name for p, d in debs.items()} == {
        p: f"{p}_0.1.0-1_{ARCHITECTURE[p]}.deb" for p in PACKAGES}
    tags = [line for line in lintian.splitlines() if re.match(r"^[EW]: ", line)]
    assert tags == [], "lintian errors/warnings:\n" + "\n".join(tags)


def test_package_contents(lab: PackagingLab) -> None:
    files = set(lab.container.exec(["dpkg", "-L", AGENT]).stdout.split())
    wire = set(lab.container.exec(["dpkg", "-L", WIRE]).stdout.split())
    for path in ("/usr/bin/portagent", "/usr/sbin/portagentd", "/etc/portagent/agent.toml",
                 "/lib/systemd/system/portagent.service", "/usr/lib/sysusers.d/portagent.conf",
                 "/usr/share/man/man1/portagent.1.gz", "/usr/share/man/man8/portagentd.8.gz",
                 "/usr/share/bash-completion/completions/portagent",
                 "/usr/share/doc/portagent/operations.md"):
        assert path in files, path
    assert "/usr/bin/portagent-broker" not in files
    conffiles = lab.container.exec(["dpkg-query", "-W", "-f=${Conffiles}", "portagent"]).stdout
    assert "/etc/portagent/agent.toml" in conffiles
    assert lab.container.exec(["getent", "group", "portagent"]).stdout.startswith("portagent:")
    # Debian's own runtime, not a vendored one: the modules come from dist-packages.
    where = lab.container.exec(["python3", "-c", "import grpc, google.protobuf, nftables, "
                                "pyroute2, portagent.agent, portagent.wire; print(grpc.__file__, "
                                "nftables.__file__, portagent.agent.__file__, "
                                "portagent.wire.__file__)"]).stdout
    assert where.count("/usr/lib/python3/dist-packages/") == 4, where
    # The host gets the agent and the shared wire code only: no CA, no test lab, and
    # the broker's package is not even installed.
    for package, own in ((AGENT, ("agent",)), (WIRE, ("wire", "v1", "health"))):
        shipped = [f for f in (files if package == AGENT else wire)
                   if "/dist-packages/portagent/" in f]
        foreign = [f for f in shipped
                   if f.split("/dist-packages/portagent/")[1].split("/")[0] not in own]
        assert shipped and not foreign, (package, foreign)
    assert "/usr/lib/python3/dist-packages/portagent/__init__.py" not in files | wire
    installed = lab.container.exec(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\\n",
                                    "portagent*", "python3-portagent*"], check=False).stdout
    assert "portagent-broker installed" not in installed, installed
    depends = lab.container.exec(["dpkg-query", "-W", "-f=${Depends}", AGENT]).stdout
    assert f"{WIRE} (= 0.1.0-1)" in depends, depends


def test_service_reaches_active(lab: PackagingLab) -> None:
    unit = lab.wait_active()
    props = lab.container.unit("Type", "NotifyAccess", "WatchdogUSec", "ExecMainStatus",
                               "StatusErrno")
    assert props["Type"] == "notify"
    assert props["WatchdogUSec"] != "0"
    # The installed unit passes systemd's own checks (no man-db in the rootfs).
    verify = lab.container.exec(["systemd-analyze", "verify", "--man=no",
                                 "/lib/systemd/system/portagent.service"], check=False)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    # The daemon announced itself in the journal, as portagentd, at notice.
    starts = lab.container.journal("ACTION=start")
    assert starts, lab.service_log()
    assert starts[-1]["SYSLOG_IDENTIFIER"] == "portagentd"
    assert starts[-1]["PRIORITY"] == "5"
    # Admin socket: root:portagent 0660 in a root:portagent 0750 directory.
    stat = lab.container.exec(["stat", "-c", "%U:%G %a", "/run/portagent",
                               "/run/portagent/admin.sock"]).stdout.split("\n")
    assert stat[0] == "root:portagent 750"
    assert stat[1] == "root:portagent 660"
    # The sandbox costs no function: nothing at warning or worse from the daemon
    # (conntrack sysctls, tamper watcher, admin socket), and accounting is on.
    complaints = lab.container.journal("SYSLOG_IDENTIFIER=portagentd", "-p", "warning")
    assert complaints == [], [r["MESSAGE"] for r in complaints]
    assert lab.net.exec_server(
        ["cat", "/proc/sys/net/netfilter/nf_conntrack_acct"]).stdout.strip() == "1"
    # Least privilege, as the kernel sees it: CAP_NET_ADMIN (bit 12) and nothing else.
    status = lab.container.exec(["cat", f"/proc/{unit['MainPID']}/status"]).stdout
    caps = dict(line.split(":\t") for line in status.splitlines() if line.startswith("Cap"))
    assert int(caps["CapEff"], 16) == int(caps["CapBnd"], 16) == 1 << 12, caps
    assert "NoNewPrivs:\t1" in status


def test_grant_opens_port_and_is_in_journal(lab: PackagingLab) -> None:
    assert not lab.can_connect(), "guarded port reachable before any grant"
    result = lab.grant()
    grant_id = result.stdout.strip()
    assert grant_id.startswith("g-"), result.stdout + result.stderr
    state["grant"] = grant_id
    assert wait_for(lab.can_connect, 10, "the granted port to open")
    records = wait_for(lambda: lab.container.journal(f"GRANT_ID={grant_id}"), 10,
                       "the grant's journal record")
    apply = [r for r in records if r.get("ACTION") == "apply"]
    assert apply, records
    record = apply[-1]
    assert record["PRIORITY"] == "5"  # notice: a port opened
    assert record["SUBJECT"] == "alice"
    assert record["PORT"] == str(GUARDED_PORT)
    assert record["PROTOCOL"] == "tcp"
    assert lab.net.client_ip in record["SOURCE"]
    assert record["_SYSTEMD_UNIT"] == "portagent.service"
    # Who opened it and why: the signed reason and the signing key (issue 12).
    assert record["GRANT_REASON"] == "packaging test"
    assert record["KEY_ID"]
    assert not any(key.startswith("CODE_") for key in record), record
    # The package's catalog was compiled by systemd's trigger: `journalctl -x` explains it.
    explained = lab.container.exec(
        ["journalctl", "--no-pager", "-x", "-u", "portagent", f"MESSAGE_ID={record['MESSAGE_ID']}"]
    ).stdout
    assert f"grant {grant_id} applied for alice" in explained, explained
    assert "man:portagentd(8)" in explained, explained


def test_refusal_is_a_warning(lab: PackagingLab) -> None:
    result = lab.grant(port=GUARDED_PORT + 1, check=False)
    assert result.returncode != 0
    refusals = wait_for(lambda: lab.container.journal("ACTION=refuse", "PRIORITY=4"), 10,
                        "a refusal at priority warning")
    assert refusals[-1]["REASON_CODE"] == "PORT_NOT_GUARDED", refusals[-1]


def test_tamper_is_an_alert_and_is_repaired(lab: PackagingLab) -> None:
    # Someone else empties our table: an alert, and the agent puts the grant back.
    lab.net.exec_server(["nft", "flush", "table", "inet", "portagent"])
    alerts = wait_for(lambda: lab.container.journal("ACTION=tamper"), 10, "a tamper alert")
    assert alerts[-1]["PRIORITY"] == "1"
    assert wait_for(lab.can_connect, 10, "the grant to be repaired")
    # The documented query for alerts finds it.
    out = lab.container.exec(["journalctl", "--no-pager", "-u", "portagent", "-p", "alert"]).stdout
    assert "ruleset changed" in out


def test_cli_over_admin_socket(lab: PackagingLab) -> None:
    grants = lab.grants_in_container()
    assert [(g["grant_id"], g["state"]) for g in grants] == [(state["grant"], "active")]
    status = lab.container.exec(["portagent", "status"]).stdout
    assert HOST_ID in status
    # A member of group portagent may use the socket; anyone else may not.
    lab.container.exec(["useradd", "--no-create-home", "--groups", "portagent", "alice"])
    lab.container.exec(["useradd", "--no-create-home", "mallory"])
    as_alice = lab.container.exec(["setpriv", "--reuid=alice", "--regid=alice", "--init-groups",
                                   "portagent", "list"], check=False)
    assert as_alice.returncode == 0, as_alice.stderr
    assert state["grant"] in as_alice.stdout
    as_mallory = lab.container.exec(["setpriv", "--reuid=mallory", "--regid=mallory",
                                     "--init-groups", "portagent", "list"], check=False)
    assert as_mallory.returncode == 2, as_mallory.stdout + as_mallory.stderr
    # The local audit chain: a member of group portagent can verify it and read it back.
    verify = lab.container.exec(["setpriv", "--reuid=alice", "--regid=alice", "--init-groups",
                                 "portagent", "audit", "verify"], check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    shown = lab.container.exec(["portagent", "audit", "show", "-o", "json"]).stdout
    actions = [json.loads(line)["action"] for line in shown.splitlines()]
    assert "start" in actions and "apply" in actions, actions


def documented_journal_queries() -> list[str]:
    """The journalctl commands of docs/operations.md's "Useful queries" block."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = text.split("Useful queries:", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.startswith("journalctl")]


def test_documented_journal_queries_work(lab: PackagingLab) -> None:
    queries = documented_journal_queries()
    assert len(queries) >= 8
    ran = 0
    for query in queries:
        if "jq " in query or re.search(r"\s-f(\s|$)", query):
            continue  # jq is not in the minimal rootfs; -f never ends
        query = query.replace("g-3f2a9c1d0b7e4a55", state["grant"])
        result = lab.container.sh(query, check=False)
        # journalctl -g exits 1 when nothing matches.
        nothing = result.returncode == 1 and "-- No entries --" in result.stdout
        assert result.returncode == 0 or nothing, f"{query}: {result.stderr}"
        ran += 1
        if "GRANT_ID=" in query or "-p alert" in query or "ACTION=refuse" in query:
            assert result.stdout.strip(), f"{query}: no output"
    assert ran >= 6


def test_man_pages_and_completion(lab: PackagingLab) -> None:
    for page in ("/usr/share/man/man1/portagent.1.gz", "/usr/share/man/man8/portagentd.8.gz"):
        text = lab.container.exec(["zcat", page]).stdout
        assert text.startswith(".\\\"") or ".TH" in text
    # Completion of the subcommands, from the shipped file (bash-completion's
    # _init_completion is stubbed: the minimal rootfs has no bash-completion).
    script = r"""
_init_completion() { cur=${COMP_WORDS[COMP_CWORD]}; prev=${COMP_WORDS[COMP_CWORD-1]};
  words=("${COMP_WORDS[@]}"); cword=$COMP_CWORD; }
_filedir() { :; }
. /usr/share/bash-completion/completions/portagent
COMP_WORDS=(portagent re); COMP_CWORD=1; _portagent; echo "${COMPREPLY[@]}"
COMP_WORDS=(portagent show ""); COMP_CWORD=2; _portagent; echo "${COMPREPLY[@]}"
"""
    out = lab.container.exec(["bash", "-c", script]).stdout.splitlines()
    assert out[0] == "revoke"
    assert out[1] == state["grant"]


def active_ids(lab: PackagingLab) -> list[str]:
    return [g["grant_id"] for g in lab.grants_in_container() if g["state"] == "active"]


def test_reload_rereads_config_and_keeps_grants(lab: PackagingLab) -> None:
    c = lab.container
    before = lab.wait_active()
    # A second guarded port, picked up by `systemctl reload` (SIGHUP) alone.
    lab.write_config([GUARDED_PORT, GUARDED_PORT + 1])
    c.exec(["systemctl", "reload", "portagent"])
    wait_for(lambda: c.journal("ACTION=reload", "PRIORITY=5"), 10, "the reload record")
    after = lab.wait_active()
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"])
    assert lab.can_connect()
    assert active_ids(lab) == [state["grant"]]
    second = lab.grant(port=GUARDED_PORT + 1).stdout.strip()
    assert second.startswith("g-")
    # The operator ends it early over the admin socket; journald has the record.
    c.exec(["portagent", "revoke", second])
    revoked = wait_for(lambda: c.journal(f"GRANT_ID={second}", "ACTION=revoke"), 10,
                       "the revoke record")
    assert revoked[-1]["PRIORITY"] == "5"
    assert active_ids(lab) == [state["grant"]]


def test_reload_with_a_bad_config_keeps_the_running_one(lab: PackagingLab) -> None:
    c = lab.container
    before = lab.wait_active()
    lab.write_config([GUARDED_PORT], extra="min_prefix_v4 = 99\n")
    c.exec(["systemctl", "reload", "portagent"])
    refused = wait_for(lambda: c.journal("ACTION=reload", "PRIORITY=3"), 10,
                       "the refused reload, at priority err")
    assert "min_prefix_v4" in refused[-1]["MESSAGE"]
    after = lab.wait_active()
    assert after["MainPID"] == before["MainPID"]
    assert lab.can_connect()


def test_config_check_before_start(lab: PackagingLab) -> None:
    c = lab.container
    lab.wait_active()
    # Still the bad config from the previous step: the daemon refuses before touching
    # the kernel and exits 78, which systemd does not retry: the unit fails once.
    result = c.exec(["systemctl", "restart", "portagent"], check=False)
    assert result.returncode != 0
    failed = c.unit("ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert failed["ActiveState"] == "failed", failed
    assert failed["Result"] == "exit-code" and failed["ExecMainStatus"] == "78", failed
    time.sleep(3)  # longer than RestartSec=2s: a restart would have happened by now
    later = c.unit("ActiveState", "NRestarts")
    assert later == {"ActiveState": "failed", "NRestarts": failed["NRestarts"]}, later
    log = c.exec(["journalctl", "--no-pager", "-u", "portagent", "-p", "err",
                  "-n", "30"]).stdout
    wanted = "portagentd: /etc/portagent/agent.toml: policy.min_prefix_v4: must be 0..32"
    lines = [line for line in log.splitlines() if wanted in line]
    assert len(lines) == 1, log
    # ...and the kernel keeps enforcing the active grant meanwhile (fail-safe).
    assert lab.can_connect()
    assert "inet portagent" in lab.nft_tables()
    lab.write_config([GUARDED_PORT])
    c.exec(["portagentd", "--check-config"])
    c.exec(["systemctl", "reset-failed", "portagent"], check=False)
    c.exec(["systemctl", "restart", "portagent"])
    lab.wait_active()
    assert active_ids(lab) == [state["grant"]]


def test_restart_keeps_grant_and_ready_means_ready(lab: PackagingLab) -> None:
    before = lab.wait_active()
    # `systemctl restart` returns when the daemon said READY=1: at that moment the
    # API must accept connections and the admin socket must answer, with no retry.
    lab.container.exec(["systemctl", "restart", "portagent"])
    assert lab.api_accepts_connections()
    assert active_ids(lab) == [state["grant"]]
    after = lab.wait_active()
    assert after["MainPID"] != before["MainPID"]
    assert lab.can_connect()


def test_upgrade_keeps_grant(lab: PackagingLab) -> None:
    # Installing the package over itself runs the upgrade path of the maintainer
    # scripts: prerm upgrade (no stop), postinst configure <old> (try-restart).
    before = lab.wait_active()
    lab.container.exec(["dpkg", "-i", f"/root/{WIRE}.deb", f"/root/{AGENT}.deb"], timeout=120)
    after = lab.wait_active()
    assert after["MainPID"] != before["MainPID"], "postinst did not restart the daemon"
    assert lab.can_connect()
    assert active_ids(lab) == [state["grant"]]


def test_stalled_daemon_is_restarted_by_the_watchdog(lab: PackagingLab) -> None:
    c = lab.container
    # A hang as an operator would see it, made from outside: SIGSTOP freezes every
    # thread of the main process, so the watchdog pings stop. systemd then kills it
    # (SIGABRT, with SIGCONT) and Restart=on-failure starts a new one. Only the
    # watchdog interval is shortened, by a runtime drop-in; the daemon has no test hook.
    c.put(WATCHDOG_DROPIN, "[Service]\nWatchdogSec=4s\n")
    try:
        c.exec(["systemctl", "daemon-reload"])
        c.exec(["systemctl", "restart", "portagent"])
        before = lab.wait_active()
        # The shell's kill: /bin/kill is in procps, which the minimal rootfs lacks.
        c.sh(f"kill -STOP {int(before['MainPID'])}")
        wait_for(lambda: int(c.unit("NRestarts")["NRestarts"]) > int(before["NRestarts"]), 30,
                 "systemd to restart the stalled daemon")
        after = lab.wait_active()
        assert after["MainPID"] != before["MainPID"]
        system_log = c.exec(["journalctl", "--no-pager", "-u", "portagent", "-g",
                             "Watchdog timeout"], check=False).stdout
        assert "Watchdog timeout" in system_log
        assert wait_for(lab.can_connect, 10, "the grant after the watchdog restart")
        assert active_ids(lab) == [state["grant"]]
    finally:
        c.exec(["rm", "-f", WATCHDOG_DROPIN], check=False)
        c.exec(["systemctl", "daemon-reload"], check=False)
        c.exec(["systemctl", "restart", "portagent"], check=False)
    lab.wait_active()


def test_security_exposure_meets_target(lab: PackagingLab) -> None:
    out = lab.container.exec(["systemd-analyze", "security", "--no-pager",
                              "portagent.service"], check=False)
    match = re.search(r"Overall exposure level for portagent\.service: (\d+\.\d+)", out.stdout)
    assert match, out.stdout + out.stderr
    exposure = float(match.group(1))
    print(f"\nsystemd-analyze security portagent.service: exposure {exposure} "
          f"(target <= {EXPOSURE_TARGET})")
    assert exposure <= EXPOSURE_TARGET, out.stdout


def test_stop_leaves_grants_in_the_kernel(lab: PackagingLab) -> None:
    lab.container.exec(["systemctl", "stop", "portagent"])
    assert lab.container.unit("ActiveState")["ActiveState"] == "inactive"
    assert "inet portagent" in lab.nft_tables()
    assert lab.can_connect(), "stopping the agent closed an active grant"
    # Every element the agent left behind still carries a kernel timeout.
    timeouts = lab.element_timeouts()
    assert timeouts, "no grant element in the kernel"
    assert all(0 < left <= 20 * 60 for left in timeouts), timeouts


def test_purge_leaves_nothing_behind(lab: PackagingLab) -> None:
    c = lab.container
    c.exec(["systemctl", "start", "portagent"])
    lab.wait_active()
    c.exec(["apt-get", "purge", "-y", AGENT], timeout=120)
    assert "inet portagent" not in lab.nft_tables()
    left = c.exec(["sh", "-c", "ls -d /etc/portagent /var/lib/portagent /run/portagent "
                   "/usr/sbin/portagentd /usr/bin/portagent /lib/systemd/system/portagent.service "
                   "/etc/systemd/system/multi-user.target.wants/portagent.service 2>/dev/null"],
                  check=False).stdout.split()
    assert left == []
    status = c.exec(["dpkg-query", "-W", "-f=${db:Status-Status}", AGENT], check=False)
    assert status.stdout in ("", "not-installed")
    # The wire package goes with its last user; then no portagent module is left.
    c.exec(["apt-get", "purge", "-y", WIRE], timeout=120)
    modules = c.exec(["sh", "-c", "ls -d /usr/lib/python3/dist-packages/portagent* "
                      f"/usr/share/doc/{AGENT} /usr/share/doc/{WIRE} 2>/dev/null"],
                     check=False).stdout.split()
    assert modules == []
    assert lab.processes_named("portagentd") == []
    load = c.unit("LoadState")["LoadState"]
    assert load == "not-found"
