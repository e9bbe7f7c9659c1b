"""``cilia-cni``: a CNI 1.0 plugin that plumbs a container into the node and registers it with the agent."""
