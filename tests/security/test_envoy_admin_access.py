"""A local user other than the agent's cannot reach the managed Envoy's admin API (dump the policy,
drain the listeners, stop Envoy) nor read its bootstrap, PID record or log. Checked as a real
unprivileged user created for the test, against a real agent and Envoy, in a state directory
that user can enter and list: only the files' own modes protect them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent_support import agent_in_process
from security_support import ADMIN_PROBE, LIST_PROBE, READ_PROBE, run_as, traversable_dir, unprivileged_user

from cilia.envoy.admin import AdminClient


def test_another_user_cannot_reach_envoys_admin_or_read_its_bootstrap() -> None:
    with traversable_dir() as base, unprivileged_user() as user:
        state = base / "state"
        with agent_in_process(state) as agent:
            assert agent.envoy is not None and agent.envoy.status().running
            # The agent makes its state directory 0700; open it up so only the files' modes protect them.
            state.chmod(0o755)
            admin = agent.status()["envoy"]["admin"]
            bootstrap = state / "envoy-bootstrap.json"
            # The user may neither talk to the admin API nor read the bootstrap or the record ...
            assert run_as(user, ADMIN_PROBE, admin) == "refused PermissionError"
            assert run_as(user, READ_PROBE, str(bootstrap)) == "refused PermissionError"
            assert run_as(user, READ_PROBE, str(state / "envoy.pid")) == "refused PermissionError"
            assert run_as(user, READ_PROBE, str(state / "envoy.log")) == "refused PermissionError"
            # ... though it gets as far as the directory and lists them: their modes protect them.
            socket_path = Path(admin.removeprefix("unix:"))
            assert socket_path.parent == state
            listed = run_as(user, LIST_PROBE, str(state)).split()
            assert {socket_path.name, bootstrap.name, "envoy.pid", "envoy.log"} <= set(listed)
            for path in (socket_path, bootstrap, state / "envoy.pid", state / "envoy.log"):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            # the owner (root, like the agent) uses the admin API as before
            assert agent.envoy.status().running and AdminClient(admin).ready()


def test_admin_socket_is_owner_only_even_with_a_permissive_umask(tmp_path: Path) -> None:
    """Envoy creates the socket; the supervisor starts it with umask 077 and the bootstrap asks
    for mode 0600, so an agent run with umask 000 still makes an owner-only socket."""
    old = os.umask(0)
    try:
        with agent_in_process(tmp_path / "state") as agent:
            admin = agent.status()["envoy"]["admin"]
            assert admin.startswith("unix:")
            mode = stat.S_IMODE(Path(admin.removeprefix("unix:")).stat().st_mode)
            assert mode == 0o600
            assert stat.S_IMODE((tmp_path / "state" / "envoy-bootstrap.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
