"""Unit tests of the primary's parts (replicator/primary/): pure tables and
the shipper with fake links; no namespaces, devices or nbdkit."""
