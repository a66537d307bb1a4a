"""The primary's side of a resource: the engine the nbdkit plugin calls
(``engine``), the shipper that streams the send ring to the secondary
(``shipper``), bitmap catch-up in consistent increments (``catchup``),
online verify (``verify``) and the persisted seq high-water mark
(``seqmark``). Nothing here imports :mod:`replicator.secondary`."""
