"""``cilia service update|list|get|delete``: the agent's services (frontends load-balanced to
backends). The flags become the API's JSON form and are checked by the same code as the agent's
(``cilia.services.validate``) before they are sent: a bad field is one line naming it, exit 2."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..services.model import Service
from ..services.validate import (
    ALGORITHMS,
    MAX_BACKENDS,
    ServiceError,
    TYPES,
    check_services,
    parse_backends,
    parse_frontend,
    service_from_json,
)
from .common import UsageError, call_agent, emit, fail, output_option, state_dir_option, table

_HEADER = ["ID", "FRONTEND", "TYPE", "BACKENDS", "ALGORITHM", "NAME"]


def _backend_text(b: dict[str, Any], weights: bool) -> str:
    text = f"{b['address']}:{b['port']}"
    if weights and b["weight"] != 1:
        text += f" (weight {b['weight']})"
    if b["state"] != "active":
        text += f" ({b['state']})"
    return text


def _frontend_text(s: dict[str, Any]) -> str:
    f = s["frontend"]
    return f"{f['address']}:{f['port']}/{f['protocol']}"


def _name(s: dict[str, Any]) -> str:
    if not s["name"]:
        return "-"
    return f"{s['namespace'] or 'default'}/{s['name']}"


def _row(s: dict[str, Any]) -> tuple[object, ...]:
    backends = ", ".join(_backend_text(b, False) for b in s["backends"]) or "(none)"
    return s["id"], _frontend_text(s), s["type"], backends, s["algorithm"], _name(s)


def _wide(s: dict[str, Any]) -> tuple[object, ...]:
    affinity = f"{s['affinity_seconds']}s" if s["affinity_seconds"] else "-"
    backends = ", ".join(_backend_text(b, True) for b in s["backends"]) or "(none)"
    labels = ",".join(f"{k}={v}" for k, v in sorted(s["labels"].items())) or "-"
    return s["id"], _frontend_text(s), s["type"], backends, s["algorithm"], _name(s), affinity, labels


def _detail(s: dict[str, Any]) -> str:
    rows = [("ID", s["id"]), ("Frontend", _frontend_text(s)), ("Type", s["type"]), ("Algorithm", s["algorithm"]),
            ("Affinity", f"{s['affinity_seconds']}s" if s["affinity_seconds"] else "none"), ("Name", _name(s)),
            ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(s["labels"].items())) or "-")]
    lines = [f"{k + ':':<11}{v}" for k, v in rows]
    lines.append("Backends:" + ("" if s["backends"] else "  (none: new connections are dropped)"))
    lines += [f"  {_backend_text(b, True)}" for b in s["backends"]]
    return "\n".join(lines)


@click.command("update")
@click.option("--id", "service_id", type=int, required=True, help="The service's id (1-16383): replaces the "
              "service with that id, if any.")
@click.option("--frontend", required=True, help="IP:PORT[/PROTO] (TCP or UDP; TCP if not given).")
@click.option("--backends", default="", help=f"IP:PORT[,IP:PORT...] (at most {MAX_BACKENDS}); none: new "
              "connections are dropped.")
@click.option("--weights", help="W[,W...]: one positive integer per backend (weighted-rr, maglev).")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="maglev", show_default=True,
              help="How a backend is chosen for a new connection.")
@click.option("--session-affinity", "affinity", type=int, default=0, show_default=True,
              help="Seconds a client address keeps its backend (0: no affinity).")
@click.option("--type", "service_type", type=click.Choice(TYPES), default="ClusterIP", show_default=True,
              help="NodePort: the frontend is a node address (0.0.0.0: every one).")
@click.option("--name", help="NAMESPACE/NAME (or NAME: namespace default): what toServices k8sService selects.")
@click.option("--labels", help="k=v,k2=v2: what toServices k8sServiceSelector matches.")
@state_dir_option
@output_option
def service_update_cmd(service_id: int, frontend: str, backends: str, weights: str | None, algorithm: str,
                       affinity: int, service_type: str, name: str | None, labels: str | None, state_dir: str,
                       output: str) -> None:
    """Add or replace a service; prints the new revision."""
    body: dict[str, Any] = {"id": service_id, "algorithm": algorithm, "affinity_seconds": affinity,
                            "type": service_type}
    try:
        body["frontend"] = parse_frontend(frontend)
        body["backends"] = parse_backends(backends, weights)
        if name:
            namespace, _, bare = name.rpartition("/")
            body.update(name=bare, namespace=namespace)
        if labels:
            pairs = [x.partition("=") for x in labels.split(",") if x.strip()]
            if any(not sep for _, sep, _ in pairs):
                raise ServiceError("labels", f"{labels!r}: expected k=v,k2=v2")
            body["labels"] = {k.strip(): v.strip() for k, _, v in pairs}
        service_from_json(body)  # the agent checks it again, with its endpoints and other services
    except ServiceError as e:
        fail(f"service {service_id}: {_flag(e.field)}: {e}")
    payload = call_agent(state_dir, lambda c: c.update_service(body))
    emit(output, payload, lambda p: f"Service {p['service']['id']}: {_frontend_text(p['service'])} -> "
                                     f"{len(p['service']['backends'])} backend(s)\nRevision: {p['revision']}")


_FLAGS = {"frontend": "--frontend", "backends": "--backends", "weights": "--weights", "algorithm": "--algorithm",
          "affinity_seconds": "--session-affinity", "type": "--type", "name": "--name", "namespace": "--name",
          "labels": "--labels", "id": "--id"}


def _flag(field: str) -> str:
    """The flag a JSON field came from (backends[1].weight came from --weights)."""
    head = field.split(".")[0].split("[")[0]
    if head == "backends" and field.endswith(".weight"):
        return "--weights"
    return _FLAGS.get(head, head)


@click.command("list")
@state_dir_option
@output_option
def service_list_cmd(state_dir: str, output: str) -> None:
    """List services: frontend, type, backends, algorithm and Kubernetes name (-o wide: weights,
    states, affinity and labels)."""
    payload = call_agent(state_dir, lambda c: c.services())
    emit(output, payload, lambda p: table(_HEADER, [_row(s) for s in p["services"]]),
         lambda p: table([*_HEADER, "AFFINITY", "LABELS"], [_wide(s) for s in p["services"]]))


@click.command("get")
@click.argument("service_id", metavar="ID", type=click.IntRange(1))
@state_dir_option
@output_option
def service_get_cmd(service_id: int, state_dir: str, output: str) -> None:
    """One service with its backends, their weights and states."""
    emit(output, call_agent(state_dir, lambda c: c.service(service_id)), _detail)


@click.command("delete")
@click.argument("service_id", metavar="ID", type=click.IntRange(1))
@state_dir_option
@output_option
def service_delete_cmd(service_id: int, state_dir: str, output: str) -> None:
    """Remove a service; prints the new revision."""
    payload = call_agent(state_dir, lambda c: c.delete_service(service_id))
    emit(output, payload, lambda p: f"Revision: {p['revision']}")


def register(cli: click.Group) -> None:
    @cli.group("service")
    def service() -> None:
        """Services: frontends load-balanced to backends (ClusterIP, NodePort)."""

    for cmd in (service_update_cmd, service_list_cmd, service_get_cmd, service_delete_cmd):
        service.add_command(cmd)


def load_service_files(paths: Sequence[str]) -> list[Service]:
    """Services from files for an offline trace: each holds one service, a list of them, or
    ``{"services": [...]}`` (what ``cilia service list -o json`` prints); JSON or YAML. Checked like
    the agent checks them; a problem names the file and the field (exit 2)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    services: list[Service] = []
    for path in paths:
        try:
            doc = YAML(typ="safe", pure=True).load(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise UsageError(f"--service {path}: {e.strerror or e}") from None
        except YAMLError as e:
            raise UsageError(f"--service {path}: not JSON or YAML: {e}") from None
        items = doc.get("services") if isinstance(doc, dict) and "services" in doc else doc
        prefix: str | None = "services" if isinstance(doc, dict) and "services" in doc else ""
        if isinstance(items, dict):
            items, prefix = [items], None
        if not isinstance(items, list):
            raise UsageError(f"--service {path}: expected a service, a list of services or {{\"services\": [...]}}")
        for i, item in enumerate(items):
            where = f"{prefix}[{i}]." if prefix is not None else ""
            try:
                service = service_from_json(item)
                check_services(service, services, {})
            except ServiceError as e:
                raise UsageError(f"--service {path}: {where}{e}") from None
            if any(s.id == service.id for s in services):
                raise UsageError(f"--service {path}: {where}id: service {service.id} is given twice")
            services.append(service)
    return services
