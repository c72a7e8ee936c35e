"""``eplbctl demo``: a local cluster of sidecars and synthetic MoE workers on one CPU machine."""
