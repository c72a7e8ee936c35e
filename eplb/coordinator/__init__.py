"""The sidecar daemon: local hub for a node's workers, and on node 0 the leader."""
