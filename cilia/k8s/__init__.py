"""Kubernetes integration: Pods (with their namespace's labels), CiliumNetworkPolicy,
CiliumClusterwideNetworkPolicy and Kubernetes NetworkPolicy, watched with the official client
and fed to the agent incrementally.

``convert`` holds the pure translations (objects as the API serves them → endpoint specs and
policy YAML); ``watch`` the watcher (list + watch per resource, relist on 410 Gone, reconnect on
a dropped stream) and ``connect`` (kubeconfig or in-cluster config → ``ApiClient``).
"""

from __future__ import annotations

from ..policy.netpol import network_policy_text
from .convert import ConvertError, endpoint_name, pod_endpoint, policy_path, policy_text
from .watch import ExactDeleteSink, Sink, WatchConfig, Watcher, connect, format_status

__all__ = ["ConvertError", "ExactDeleteSink", "Sink", "WatchConfig", "Watcher", "connect", "endpoint_name",
           "format_status", "network_policy_text", "pod_endpoint", "policy_path", "policy_text"]
