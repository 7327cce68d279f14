"""Every fixed duration pdserve waits, bounds or paces by, each with the
reason for its value. Durations a user sets are Settings fields
(``--kv-lease-seconds``, ``--*-timeout``); these are not flags.

Imports nothing from pdserve, so every layer can import it.
"""

from __future__ import annotations

import os
from datetime import timedelta

from vllm import envs as vllm_envs

# ---- producer: KV side-channel server (connector/kv_server.py) ----

# A proven connection with nothing to answer closes after this long without a
# request: long enough that a steady consumer never reconnects, short enough
# that links of consumers gone away do not hold connection slots for long.
IDLE_CONNECTION_SECONDS = 300.0
# The same for connections anyone can open (without a secret: all of them):
# short, so idle ones cannot hold the slots; a consumer's link connects again
# for its next read.
OPEN_IDLE_CONNECTION_SECONDS = 15.0
# A peer that owes its proof of the KV secret holds a connection at most this
# long in all: a consumer proves within a round trip.
AUTH_SECONDS = 2.0
# A read that overtook its lease's grant waits this many engine steps (the
# grant comes with the next one; a few more absorb a slow step)...
GRANT_WAIT_STEPS = 4
# ...and never longer than this, however slowly the engine steps.
GRANT_WAIT_SECONDS = 10.0
# A read naming a GPU-direct session still being set up waits for it at most
# this long: a first NCCL group or IPC mapping can take tens of seconds.
SESSION_WAIT_SECONDS = 60.0
# A made session welcome may wait this long to leave (its connection's
# earlier answers go first) before the session is given up: room for a busy
# connection's earlier answers.
WELCOME_SEND_SECONDS = 30.0
# Without an engine step for this long (longer than a step takes) the idle
# thread pumps the side channel instead of the engine...
ENGINE_IDLE_SECONDS = 0.05
# ...checking this often: handshakes and releases wait at most a few ms.
IDLE_POLL_SECONDS = 0.005
# Refused connections are logged at most this often: a flood is one line.
REFUSAL_LOG_SECONDS = 10.0

# ---- consumer engine: pairing, pulls and releases (connector/) ----

# A failed pairing with a producer is not tried again for this long, counted
# from the end of the failed attempt: a producer that is down is not hammered.
REHANDSHAKE_BACKOFF_SECONDS = 1.0
# How often the watch thread asks paired producers who they are (a restart or
# a death is noticed within about this long)...
WATCH_SECONDS = 1.0
# ...and how long it waits for an answer: a busy producer is not taken for dead.
WATCH_TIMEOUT_SECONDS = 2.0
# While the engine is idle the watch thread sends pending releases for up to
# this long (a connection to open and prove included)...
FLUSH_SECONDS = 3.0
# ...pumping this often: a release leaves within milliseconds.
FLUSH_PUMP_SECONDS = 0.002
# A release sent on a connection that then ran this long without breaking has
# arrived (a round trip is far shorter); until then it may go again.
RELEASE_CONFIRM_SECONDS = 5.0
# Releases waiting for a connection are kept this long: the producer's leases
# end on their own by then (--kv-lease-seconds, 30 by default).
RELEASE_KEEP_SECONDS = 60.0
# After a connection attempt failed, releases alone wait this long before the
# next one: a producer that is down is not hammered.
RECONNECT_SECONDS = 1.0

# ---- CPU nodes: pacing spinning engines (connector/cpu_pacing.py) ----

# A producer step with no forward and nothing being served (the engine steps
# only because some rank holds a lease) sleeps this long on CPU, on every
# rank: gives the shared cores back, adds nothing a read would see.
PRODUCER_IDLE_SECONDS = 0.005
# A consumer waiting for KV sleeps this long each step while a pull is in
# progress: shorter, since each sleep may delay the pull's end.
CONSUMER_WAIT_SECONDS = 0.002

# ---- transports (transport/) ----

# ipc: how long a producer keeps blocks for a consumer that copies them by
# itself: far past any copy, bounded for a consumer that died mid-copy.
IPC_HOLD_SECONDS = 30.0
# nccl: bound on the rendezvous store and on a pair's first send/receive: two
# processes that both meant to pair meet within it.
NCCL_STORE_TIMEOUT = timedelta(seconds=30)
# nccl: our own deadlines decide; NCCL's watchdog must never act first.
NCCL_GROUP_TIMEOUT = timedelta(hours=24)
# nccl: bound on one transfer (the 30 s of --kv-transfer-timeout's default);
# PDSERVE_NCCL_TRANSFER_SECONDS overrides it.
NCCL_TRANSFER_SECONDS = float(os.environ.get("PDSERVE_NCCL_TRANSFER_SECONDS", "30"))

# ---- consumer HTTP layer: finding and watching producers ----

# How often producer names are resolved again: a producer pod that joins a
# headless Service serves within about this long.
RESOLVE_SECONDS = 5.0
# Bounds on one resolution and one metadata fetch of a new producer: one
# slow name or producer never delays the next round.
RESOLVE_TIMEOUT_SECONDS = 5.0
METADATA_TIMEOUT_SECONDS = 5.0
# How long an address remembers which instances answered there: a restart is
# one new instance; an old one answering again within this (many restarts'
# time) is a load-balanced URL.
INSTANCE_MEMORY_SECONDS = 600.0
# Idle connections to a producer are closed after this long, well before its
# HTTP server (vLLM's) closes them (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by
# default; the nodes of a deployment share it): aiohttp keeps them 15 s by
# default, and a call sent on a connection the producer closes at that moment
# fails as unreachable, marking the producer down and prefilling the request
# here.
PRODUCER_KEEPALIVE_SECONDS = vllm_envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE / 2
# A recovered producer is used again within about two of these; each /health
# probe is bounded by it too, so a hung producer never holds one.
HEALTH_PROBE_SECONDS = 2.0
# Bound on a hung producer's work probe: room for a busy producer's queue.
WORK_PROBE_SECONDS = 10.0
# Startup: bound on one metadata request; rounds repeat until
# --producer-connect-timeout (a producer still loading answers nothing).
STARTUP_FETCH_SECONDS = 10.0
# Startup handshakes (metadata, rank info) try again after this long: a
# producer that is still starting is asked about once a second.
HANDSHAKE_RETRY_SECONDS = 1.0
# A request proof is accepted within this of the producer's wall clock: both
# nodes' clocks must agree this well (NTP does far better).
PROOF_FRESH_SECONDS = 60.0

# ---- consumer HTTP layer: following its engine's KV events (prefix index) ----

# How long the subscriber waits for an event before it looks at its replay
# (zmq polls in milliseconds): its stop is noticed within this too.
KV_EVENTS_POLL_MS = 200
# Bound on waiting for each frame of a replay: the engine's own process
# answers at once unless it is gone.
KV_EVENTS_REPLAY_MS = 2000
# After this long without events the replay is asked for anything newer (PUB
# drops what it sent before the subscription reached it; a lost last batch
# shows no gap).
KV_EVENTS_SYNC_SECONDS = 1.0
