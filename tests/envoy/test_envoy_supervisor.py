"""EnvoySupervisor with the real Envoy binary: start, readiness, restarts, stop, failures."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from envoy_support import (
    FAST_BACKOFF,
    GREETING,
    bootstrap_yaml,
    free_port,
    http_get,
    never_ready_bootstrap_yaml,
    process_exists,
    process_running,
    start_time,
    static_envoy,
    supervised,
    wait_until,
)

from cilia.envoy.admin import AdminClient, AdminUnavailable
from cilia.envoy.supervisor import Backoff, EnvoyStartError, EnvoyState, EnvoySupervisor, envoy_binary


def test_start_waits_until_envoy_serves(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env) as sup:
        status = sup.status()
        assert status.running and status.state is EnvoyState.RUNNING
        assert status.pid is not None and process_exists(status.pid)
        assert status.restarts == 0 and status.last_error is None
        # ready means ready: the listener answers right away
        assert http_get(env.listener_port) == (200, GREETING + "\n")
        assert "starting" in env.log.read_text()


def test_runs_the_real_binary_with_hot_restart_off(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, concurrency=2)
    cmd = sup.command()
    assert cmd[0] == str(envoy_binary())
    assert "--disable-hot-restart" in cmd
    assert cmd[cmd.index("--concurrency") + 1] == "2"
    assert "--base-id" in EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log,
                                          base_id=7).command()
    with pytest.raises(ValueError):
        EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, base_id=1,
                        use_dynamic_base_id=True)


def test_sigkill_makes_the_supervisor_restart_envoy(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env) as sup:
        old = sup.status().pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        status = sup.wait_for(lambda s: s.running and s.restarts == 1, timeout=20)
        assert status.pid is not None and status.pid != old
        assert not process_exists(old)  # the dead one was reaped
        assert status.last_exit_code == -signal.SIGKILL
        assert status.last_error is not None and "SIGKILL" in status.last_error
        assert AdminClient(env.admin_address).ready()
        assert http_get(env.listener_port) == (200, GREETING + "\n")
        assert env.log.read_text().count("--- cilia: starting") == 2


def test_failed_restarts_back_off_and_recover(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    good = env.bootstrap.read_text()
    with supervised(env) as sup:
        old = sup.status().pid
        assert old is not None
        env.bootstrap.write_text(bootstrap_yaml(env.admin_port, env.listener_port,
                                                extra_hcm_field="bogus_field: 1"))
        os.kill(old, signal.SIGKILL)
        status = sup.wait_for(lambda s: s.restarts >= 2 and s.state is EnvoyState.BACKOFF, timeout=20)
        assert status.last_error is not None
        assert "restart failed" in status.last_error and "bogus_field" in status.last_error
        assert status.last_exit_code == 1
        env.bootstrap.write_text(good)
        status = sup.wait_for(lambda s: s.running, timeout=20)
        assert http_get(env.listener_port) == (200, GREETING + "\n")


def test_stop_during_backoff_ends_supervision_at_once(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    slow = Backoff(initial=300.0, maximum=300.0)
    with supervised(env, backoff=slow) as sup:
        pid = sup.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        sup.wait_for(lambda s: s.state is EnvoyState.BACKOFF, timeout=20)
        status = sup.stop()  # would hang for the 300 s delay if the wait were not interruptible
    assert status.state is EnvoyState.STOPPED and status.restarts == 0 and status.pid is None
    assert status.last_exit_code == -signal.SIGKILL


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, backoff=FAST_BACKOFF)
    try:
        with sup:
            pid = sup.status().pid
            assert pid is not None and process_exists(pid)
    finally:
        sup.stop()
    assert not process_exists(pid)
    status = sup.status()
    assert status.state is EnvoyState.STOPPED and status.pid is None and status.restarts == 0
    assert status.last_exit_code == 0  # Envoy exits cleanly on SIGTERM
    with pytest.raises(AdminUnavailable):
        AdminClient(env.admin_address, timeout=1).ready()
    assert sup.stop() == status  # a second stop changes nothing


def test_rejected_bootstrap_fails_start_with_envoys_message(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    env.bootstrap.write_text(bootstrap_yaml(env.admin_port, env.listener_port, extra_hcm_field="bogus_field: 1"))
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, backoff=FAST_BACKOFF)
    try:
        with pytest.raises(EnvoyStartError) as caught:
            sup.start()
    finally:
        sup.stop()
    message = str(caught.value)
    headline = message.splitlines()[0]
    # Envoy's own words on the first line (protobuf randomizes their spacing, so compare words)
    assert headline.startswith("Envoy exited with exit code 1 before becoming ready: ")
    assert "no such field: 'bogus_field'" in headline
    assert "--- envoy log (last lines) ---" in message
    assert caught.value.exit_code == 1
    status = sup.status()
    assert status.state is EnvoyState.FAILED and status.pid is None
    assert status.last_error == message


def test_never_ready_envoy_is_stopped_after_the_timeout(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    env.bootstrap.write_text(never_ready_bootstrap_yaml(env.admin_port, free_port()))
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, ready_timeout=1.0)
    try:
        with pytest.raises(EnvoyStartError, match=r"not ready within 1.0s"):
            sup.start()
    finally:
        sup.stop()
    assert sup.status().pid is None
    with pytest.raises(AdminUnavailable):
        AdminClient(env.admin_address, timeout=1).ready()


def test_listener_port_in_use_fails_start_with_envoys_message(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", env.listener_port))
        taken.listen()
        sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log)
        try:
            with pytest.raises(EnvoyStartError) as caught:
                sup.start()
        finally:
            sup.stop()
    assert str(caught.value).splitlines()[0].endswith(
        f"cannot bind '127.0.0.1:{env.listener_port}': Address already in use")


def test_refuses_an_admin_address_another_envoy_answers_on(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env) as first:
        second = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=tmp_path / "second.log")
        try:
            with pytest.raises(EnvoyStartError, match="already answers"):
                second.start()
        finally:
            second.stop()
        assert first.status().running


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(initial=0.5, maximum=4.0, multiplier=2.0)
    assert [b.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert b.delay(10_000) == 4.0


def test_backoff_returns_to_the_minimum_once_envoy_served_for_a_while(tmp_path: Path) -> None:
    """Crashes soon after each restart back off more and more; once a restarted Envoy has been
    ready for ``reset_after`` seconds, the next crash waits only the initial delay again."""
    env = static_envoy(tmp_path)
    backoff = Backoff(initial=0.05, maximum=5.0, multiplier=2.0, reset_after=5.0)
    with supervised(env, backoff=backoff) as sup:
        assert sup.status().restart_delay == 0.05 and sup.status().last_restart_delay is None
        for restarts, waited in ((1, 0.05), (2, 0.1), (3, 0.2)):
            pid = sup.status().pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # at once after the restart: a crash loop
            status = sup.wait_for(lambda s, n=restarts: s.running and s.restarts == n, timeout=20)  # type: ignore[misc]
            assert status.last_restart_delay == waited
        assert sup.status().restart_delay == 0.4
        # served for reset_after: the supervisor says so while Envoy runs, not at its next crash
        status = sup.wait_for(lambda s: s.restart_delay == 0.05, timeout=30)
        assert status.running and status.restarts == 3
        pid = status.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        status = sup.wait_for(lambda s: s.running and s.restarts == 4, timeout=20)
        assert status.last_restart_delay == 0.05


def test_the_default_backoff_forgives_a_crash_after_seconds_not_minutes() -> None:
    """The agent's supervisor uses the default: an Envoy killed every few seconds must not back
    off towards the 30 s maximum (before: only after 60 s of serving)."""
    assert Backoff().reset_after <= 5.0 < Backoff().maximum


def test_envoy_dies_with_the_process_that_supervises_it(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    script = ("import sys, time\n"
              "from cilia.envoy.supervisor import EnvoySupervisor\n"
              "sup = EnvoySupervisor(sys.argv[1], sys.argv[2], log_path=sys.argv[3])\n"
              "print(sup.start().pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(env.bootstrap), env.admin_address, str(env.log)],
                              stdout=subprocess.PIPE, text=True)
    envoy_pid = None
    try:
        assert parent.stdout is not None
        envoy_pid = int(parent.stdout.readline())
        assert process_running(envoy_pid)
        parent.kill()  # kill -9: the supervisor gets no chance to stop Envoy
        parent.wait()
        wait_until(lambda: not process_running(envoy_pid), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if envoy_pid is not None and process_running(envoy_pid):
            os.kill(envoy_pid, signal.SIGKILL)


def test_start_stops_the_envoy_recorded_in_the_pid_file(tmp_path: Path) -> None:
    """A leftover Envoy (started outside any supervisor) holds the listener port and the admin
    address; start() stops it because the pid file records it, then starts its own."""
    env = static_envoy(tmp_path, unix_admin=True)
    pid_file = tmp_path / "envoy.pid"
    leftover = subprocess.Popen([str(envoy_binary()), "-c", str(env.bootstrap), "--disable-hot-restart"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: _answers(env.listener_port), timeout=20)
        pid_file.write_text(json.dumps({"pid": leftover.pid, "start_time": start_time(leftover.pid)}))
        with supervised(env, pid_file=pid_file) as sup:
            assert leftover.poll() == 0  # SIGTERM was enough: Envoy exits cleanly on it
            pid = sup.status().pid
            assert pid is not None and pid != leftover.pid
            assert json.loads(pid_file.read_text()) == {"pid": pid, "start_time": start_time(pid)}
            assert stat.S_IMODE(pid_file.stat().st_mode) == 0o600
            assert http_get(env.listener_port) == (200, GREETING + "\n")
            assert f"stopped leftover Envoy pid {leftover.pid}" in env.log.read_text()
        assert not pid_file.exists()  # stopped on request: nothing left to record
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    pid_file = tmp_path / "envoy.pid"
    other = subprocess.Popen(["sleep", "600"])
    try:
        # same PID, another start time: the recorded Envoy is gone and its PID was reused
        pid_file.write_text(json.dumps({"pid": other.pid, "start_time": start_time(other.pid) - 1}))
        with supervised(env, pid_file=pid_file):
            assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_an_unreadable_pid_file_fails_the_start_naming_the_file(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    pid_file = tmp_path / "envoy.pid"
    pid_file.write_text("{not json")
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, pid_file=pid_file)
    try:
        with pytest.raises(EnvoyStartError, match=f"cannot tell which Envoy ran before: {pid_file}: "):
            sup.start()
    finally:
        sup.stop()
    assert sup.status().pid is None


def test_unix_admin_socket_is_owner_only(tmp_path: Path) -> None:
    env = static_envoy(tmp_path, unix_admin=True)
    with supervised(env) as sup:
        assert env.admin_socket is not None
        assert stat.S_IMODE(env.admin_socket.stat().st_mode) == 0o600
        assert sup.admin.ready()


def _answers(port: int) -> bool:
    try:
        return http_get(port)[0] == 200
    except OSError:
        return False


def test_an_envoy_that_cannot_be_recorded_is_not_left_running(tmp_path: Path) -> None:
    """Fail closed: an Envoy the next start could not find is stopped at once."""
    env = static_envoy(tmp_path)
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log,
                          pid_file=tmp_path / "no-such-dir" / "envoy.pid")
    try:
        with pytest.raises(EnvoyStartError, match="cannot record Envoy's PID in .*no-such-dir/envoy.pid"):
            sup.start()
    finally:
        sup.stop()
    assert sup.status().state is EnvoyState.FAILED and sup.status().pid is None
    with pytest.raises(AdminUnavailable):
        AdminClient(env.admin_address, timeout=1).ready()
