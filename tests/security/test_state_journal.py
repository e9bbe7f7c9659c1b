"""The agent's state is journaled: an endpoint add appends one record of its own (state.json is not
rewritten whole at every change, which cost as much as the state is big), every acknowledged
revision survives ``kill -9`` of the agent and a record torn by a crash, compaction now and then
folds the journal into state.json, and a damaged journal is refused naming file and line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.agent.agent_support import AgentProcess, agent_in_process, run_cli

from cilia.agent import state as state_module
from cilia.agent.journal import read
from cilia.agent.state import JOURNAL_FILE, STATE_FILE, AgentState, PolicySource, StateWriter, load_state
from cilia.specs import EndpointSpec, StateError

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: client}}]}]
"""


def _spec(i: int) -> EndpointSpec:
    return EndpointSpec(f"ep{i}", ("app=web",), (f"10.31.{i >> 8}.{i & 255}",), ())


def _records(state: Path) -> list[dict[str, object]]:
    generation = json.loads((state / STATE_FILE).read_text())["journal"]
    return read(state / JOURNAL_FILE, generation)[0]


def test_an_add_appends_one_record_of_its_own(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none") as agent:
        for i in range(60):
            agent.add_endpoint(_spec(i))
        before = (state / STATE_FILE).stat()
        agent.add_endpoint(_spec(60))
        after = (state / STATE_FILE).stat()
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
        last = _records(state)[-1]
        assert set(last["endpoints"]) == {"ep60"}, last  # type: ignore[arg-type]
        assert last["revision"] == agent.state.revision and "policies" not in last
        agent.remove_endpoint("ep3")
        assert _records(state)[-1]["endpoints"] == {"ep3": None}
    assert sorted(load_state(state).endpoints) == sorted(f"ep{i}" for i in range(61) if i != 3)


def _snapshot(state: Path) -> dict[str, object]:
    return {"revision": run_cli(state, "status", "-o", "json").json()["revision"],
            "policies": run_cli(state, "policy", "get", "-o", "json").json(),
            "endpoints": run_cli(state, "endpoint", "list", "-o", "json").json()}


def test_every_acknowledged_revision_survives_kill_9_and_a_torn_record(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    policy = tmp_path / "web.yaml"
    policy.write_text(POLICY)
    agent = AgentProcess(state, "--envoy", "none")
    try:
        agent.start()
        for crash in range(3):
            for i in range(4):
                n = crash * 4 + i
                assert run_cli(state, "endpoint", "add", "--name", f"ep{n}", "--labels", "app=web",
                               "--ip", f"127.0.31.{n + 1}").code == 0
            assert run_cli(state, "policy", "import", str(policy)).code == 0
            assert run_cli(state, "endpoint", "delete", f"ep{crash * 4}").code == 0
            acknowledged = _snapshot(state)
            assert agent.proc is not None
            agent.proc.kill()  # kill -9
            agent.proc.wait()
            agent.proc = None
            with open(state / JOURNAL_FILE, "ab") as journal:  # a crash in the middle of an append
                journal.write(b'1234abcd {"revision": 99, "endpoi')
            agent.start()
            assert _snapshot(state) == acknowledged, crash
    finally:
        agent.stop()
    assert load_state(state).revision == acknowledged["revision"]


def test_compaction_folds_the_journal_into_the_snapshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "COMPACT_MIN_BYTES", 2000)
    state = tmp_path / "state"
    state.mkdir()
    writer = StateWriter(state)
    live = writer.loaded
    live.add_source("web.yaml", POLICY, {("CiliumNetworkPolicy", "default", "web")})
    for i in range(200):
        live.revision += 1
        if i % 3 == 2:
            del live.endpoints[f"ep{i - 1}"]
        else:
            live.endpoints[f"ep{i}"] = _spec(i)
        if i % 50 == 0:
            live.endpoint_ids[f"ep{i}"] = i + 1
            live.proxy_ports[f"ingress/{i}"] = 10000 + i
        writer.write(live)
        loaded = load_state(state)
        assert (loaded.revision, loaded.endpoints, loaded.endpoint_ids, loaded.proxy_ports) == \
            (live.revision, live.endpoints, live.endpoint_ids, live.proxy_ports), i
        assert [(s.path, s.text, s.keys) for s in loaded.sources] == [(s.path, s.text, s.keys) for s in live.sources]
    assert writer.compactions > 2  # the one at start and some along the way
    assert (state / JOURNAL_FILE).stat().st_size < 2 * max(2000, (state / STATE_FILE).stat().st_size) + 1000
    writer.close()


def test_a_crash_between_snapshot_and_new_journal_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    writer = StateWriter(state)
    live = writer.loaded
    for i in range(5):
        live.revision += 1
        live.endpoints[f"ep{i}"] = _spec(i)
        writer.write(live)
    writer.close()
    # the next compaction wrote state.json (generation + 1) and died before starting its journal
    snapshot = json.loads((state / STATE_FILE).read_text())
    whole = AgentState(live.revision, [PolicySource("x.yaml", POLICY, set())], dict(live.endpoints))
    (state / STATE_FILE).write_text(json.dumps({**whole.to_json(), "journal": snapshot["journal"] + 1}))
    loaded = load_state(state)  # the old journal's records are in that snapshot: not applied twice
    assert (loaded.revision, sorted(loaded.endpoints)) == (live.revision, [f"ep{i}" for i in range(5)])
    assert [s.path for s in loaded.sources] == ["x.yaml"]


def test_a_damaged_record_before_others_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    writer = StateWriter(state)
    for i in range(3):
        writer.loaded.revision += 1
        writer.loaded.endpoints[f"ep{i}"] = _spec(i)
        writer.write(writer.loaded)
    writer.close()
    lines = (state / JOURNAL_FILE).read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"ep1", b"ep9")  # the checksum no longer matches
    (state / JOURNAL_FILE).write_bytes(b"".join(lines))
    with pytest.raises(StateError, match=rf"{JOURNAL_FILE}:3: damaged journal record"):
        load_state(state)
    res = subprocess.run([sys.executable, "-m", "cilia", "agent", "--state-dir", str(state), "--envoy", "none"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and f"{JOURNAL_FILE}:3" in res.stderr and "Traceback" not in res.stderr, res.stderr
