"""Duplex: asynchronous, write-ordered block-device replication.

The module map, one line each (the architecture is docs/DESIGN.md, and
"DESIGN §n" names the section that explains a module). Neither role package
imports the other; ``protocol`` imports only itself and the record and CRC
helpers (tests/shared/test_boundaries.py checks both).

The primary, inside nbdkit (``primary/``, DESIGN §3, §4):
    primary.engine        what the nbdkit plugin calls: the C core, the shipper, status
    primary.shipper       streams the send ring to the secondary; reconnects, resumes
    primary.catchup       catch-up in increments, each a point-in-time image
    primary.verify        online verify: compare track digests of both sides
    primary.seqmark       the persisted seq high-water mark (a seq is never reused)
    primary.states        the primary's replication states and their allowed moves
    primary.admin         the admin's commands on a primary: disconnect, pause-sync, switchover
    primary.flowctl       what a write waits for in which state: protocol B/C, block, max-lag

The secondary (``secondary/``, DESIGN §6):
    secondary.daemon      receives, journals, applies in-order runs, acknowledges
    secondary.journal     the preallocated journal: records durable before they are acked
    secondary.pending     the pending write queue ordered by seq (tokens, data, gaps)
    secondary.applier     writes runs of records to the image (write, trim, zero, flush)
    secondary.increments  catch-up increments: staged, or in place, applied at COMMIT
    secondary.snapshot    reflink snapshots for increments too large to stage
    secondary.lossreport  the loss report a promotion writes (DESIGN §7)
    secondary.admin       the admin's commands on a secondary: invalidate, outdate, clean stop

The wire protocol, sans-IO (``protocol/``, DESIGN §9):
    protocol.frames       the frame codec: header, CRC32C, streaming decoder
    protocol.messages     one immutable class per frame type, strict encode/decode
    protocol.auth         the two-way HMAC-SHA256 challenge
    protocol.state        the connection state machine, as a table
    protocol.compat       can two STATEs replicate one resource
    protocol.connection   the Connection tying them together, for either role
    protocol.errors       ProtocolError, FrameError, LocalProtocolError, ErrorCode
    protocol.compression  compressed DATA / INCR_DATA payloads: zstd, lz4, bounded decoding

The C core's Python face (``native/``, the only code that touches cffi):
    native.ffi            the compiled module's handle, error classes, shared helpers
    native.crc32c         CRC32C, SSE4.2 where the CPU has it
    native.records        checking a buffer of packed records in one call
    native.ring           the tokens of a span of the send ring
    native.bitmap         Bitmap: OOS, CR and frozen track bitmaps (DESIGN §5)
    native.actlog         ActivityLog: write-ahead active extents (DESIGN §5)
    native.core           Core: the write path, its send ring, catch-up increments
    native.ship           the C streaming loop (TOKENS + DATA per span)
    native.rxq            the secondary's pending queue and applier loop in C

Consistency groups across primary hosts (``group/``, DESIGN §13):
    group.rendezvous      the rendezvous master's rule: when a point is released (pure)
    group.member          a member secondary's gate: its released point, held markers, group.json
    group.notes           the JSON note a group's MARK record carries
    group.clock           the clock offset of a primary to the primary master
    group.channel         the group channel's sockets: a listening master, a member's link
    group.side            what both sides' agents share: joining, the channel, the checks
    group.primaries       a member's primary side: checkpoints, heartbeats, markers
    group.secondaries     a member's secondary side: reports, releases, completion
    group.view            ``duplex status GROUP`` from this host's members
    protocol.group        the group channel's protocol: JSON messages, schema table, HMAC

Shared by both roles:
    records               the replication record: one encoding for ring, wire, journal
    crc32c                CRC32C, with a pure-Python fallback
    tracks                zero check, track digests, runs and ranges of tracks
    layout                the volumes of a resource laid end to end in one logical space
    generations           generation identifiers: who is ahead, split brain (DESIGN §7)
    peerlink              the socket shell around a protocol Connection
    tls                   TLS for the link and the group channel: contexts, names, TlsSocket
    metadata              a node's metadata, and every file name in its meta-dir
    oosfiles              the OOS bitmap and activity log, opened and recovered together
    fileio                whole-file writes and durable atomic replacement
    supervise             supervised threads: faults logged, recorded, restarted (DESIGN §11)
    errors                DuplexError, the base of every error a user can cause
    sizes                 parsing and printing sizes, rates and durations
    modes                 protocol A/B/C, on-disconnect, on-congestion, max-lag (DESIGN §3)
    config                the TOML configuration: resources and their two nodes
    devices               the device: its size, an exclusive claim, who else holds it
    volumes               a node's volumes against its metadata: claimed, sized, laid out

Operations:
    cli                   the ``duplex`` command line
    node                  ``duplex up`` (nbdkit for the primary) and ``create-md``
    exportuse             who uses the primary's export; a bounded, explained stop of ``up``
    promote               ``duplex promote`` and ``duplex demote`` (DESIGN §7)
    attach                ``duplex attach`` / ``detach``: a block device for the export
    control               the local control socket of a running node
    status                the status schema, its derivation from metadata, rendering
    events                ``duplex events``: status snapshots diffed into event lines (DESIGN §14)
    handlers              the commands of ``[resource.R.handlers]``, run from the events
    metrics               Prometheus metrics of a running node, from its status
    notify                systemd readiness notification (sd_notify), the unit we run in
    journallog            log records to the systemd journal with the resource and node
"""
