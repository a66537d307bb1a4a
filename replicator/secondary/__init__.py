"""The secondary's side of a resource: the receiving daemon (``daemon``),
its journal (``journal``), the pending write queue ordered by seq
(``pending``), the applier of in-order runs (``applier``), catch-up
increments staged and committed atomically (``increments``), reflink
snapshots (``snapshot``) and the loss report of a promote
(``lossreport``). Nothing here imports :mod:`replicator.primary`."""
