"""The node runtime: the daemon that supervises a pulse and a manager process per node."""
