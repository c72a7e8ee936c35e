"""A discrete-event simulation of the rebalance protocol at scale: the real sans-IO cores (the
leader's, one follower's per node with or without per-node aggregation, one worker agreement
per rank; :mod:`eplb.sim.cores` is the only module that calls them) driven by a virtual clock
and a network model (:mod:`eplb.sim.network`), no sockets. :mod:`eplb.sim.cluster` runs one
scenario; ``bench/simulate.py`` prints the table."""
