#!/bin/sh
# /opt/cni/bin/cilia-cni on a Kubernetes node (installed by the DaemonSet's install-cni init container).
#
# Container runtimes run CNI plugins on the node, but cilia-cni is Python that lives in the cilia image.
# This shim runs the image's plugin in the agent container's mount namespace: the runtime's CNI_*
# environment, the network configuration on stdin and the result on stdout pass through unchanged,
# and the plugin finds there what it needs (ip, nsenter, the agent's socket, /run/netns, /var/lib/cni,
# and the node's /opt/cni/bin for a delegated IPAM plugin).
# The agent container writes its PID (a node PID: the pod has hostPID) to agent.pid as it starts.
state_dir=${CILIA_STATE_DIR:-/var/run/cilia}
plugin=/opt/cilia/venv/bin/cilia-cni

fail() {  # a CNI error object (code 11: try again later) on stdout, as the runtime expects
    printf '{"cniVersion": "1.0.0", "code": 11, "msg": "%s", "details": "%s"}\n' "$1" "$2"
    exit 1
}

pid=$(cat "$state_dir/agent.pid" 2>/dev/null) || fail "the cilia agent is not running on this node" \
    "no $state_dir/agent.pid"
case $pid in
    '' | *[!0-9]*) fail "the cilia agent is not running on this node" "$state_dir/agent.pid holds no PID" ;;
esac
# A stale file may name a PID that is gone or now another process: it must have the plugin.
[ -x "/proc/$pid/root$plugin" ] || fail "the cilia agent is not running on this node" \
    "process $pid from $state_dir/agent.pid is not the cilia agent"
exec nsenter --target "$pid" --mount -- "$plugin" "$@"
