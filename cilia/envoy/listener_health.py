"""Does Envoy serve the listeners it was sent? Health that an ACK alone cannot give.

Envoy ACKs a listener update before the listeners bind and serve, keeps serving nothing after
``POST /drain_listeners`` while still saying LIVE, and a listener it rejected (its port held by
another process) stays missing until the next update. What Envoy 1.40 reports, and what this
module reads:

* ``/config_dump?resource=dynamic_listeners`` (masked to names and states): a listener that
  serves has ``active_state``; ``warming_state`` is not serving yet; ``error_state`` carries the
  message of its last failed update (cleared by the next successful one);
* ``/stats``: ``listener_manager.listener_stopped`` counts listeners stopped by
  ``/drain_listeners``. Stopped listeners still show as active in the config dump and in
  ``/listeners``, ``server.state`` stays LIVE, and listeners added afterwards are ACKed but never
  served: a drained Envoy serves nothing until it is restarted;
* ``/ready``: the server state (LIVE, or DRAINING, PRE_INITIALIZING, INITIALIZING).
"""

from __future__ import annotations

from collections.abc import Collection

from cilia.envoy.admin import AdminClient, AdminError

__all__ = ["STOPPED_STAT", "listener_problems"]

STOPPED_STAT = "listener_manager.listener_stopped"


def listener_problems(admin: AdminClient, sent: Collection[str]) -> list[str]:
    """One line per reason Envoy does not serve exactly the listeners named in ``sent``; empty
    when it does. ``sent``: the listener names of the last version sent to this Envoy (while an
    update is in flight, its new listeners show as missing until Envoy applies it).

    Reported: Envoy not LIVE; listeners stopped by ``/drain_listeners``; per sent name, rejected
    (with Envoy's message, also when an older version of it still serves), warming, draining
    only, or missing; and active listeners that were not sent. Only dynamic (xDS) listeners are
    compared. An admin API that cannot be read is a problem too."""
    try:
        server_state = admin.state()
        stopped = admin.stats(f"^{STOPPED_STAT.replace('.', '[.]')}$").get(STOPPED_STAT, 0)
        states = admin.listener_states()
    except AdminError as exc:
        return [f"cannot read Envoy's listeners: {exc}"]
    problems = []
    if server_state != "LIVE":
        problems.append(f"Envoy is {server_state or 'not ready'}, not LIVE")
    if stopped:
        problems.append(f"Envoy stopped its listeners ({stopped} stopped, e.g. by POST /drain_listeners): "
                        "it serves no proxied traffic until it is restarted")
    for name in sorted(sent):
        state = states.get(name)
        if state is None:
            problems.append(f"listener {name} is missing in Envoy")
        elif state.error is not None:
            older = " (an older version of it still serves)" if state.active else ""
            problems.append(f"listener {name} was rejected by Envoy{older}: {state.error}")
        elif state.active:
            continue
        elif state.warming:
            problems.append(f"listener {name} is warming, not serving yet")
        else:
            problems.append(f"listener {name} is draining, not serving")
    problems += [f"listener {name} is active in Envoy but was not sent"
                 for name in sorted(n for n, st in states.items() if st.active and n not in sent)]
    return problems
