"""The KV side channel between a consumer rank and a producer rank.

Its wire (``protocol``: messages, framing, tags; ``channel``: a non-blocking
connection) sits under the transports, which set their sessions up over it;
its two ends sit over them: ``client`` (the consumer's links to a producer's
ranks, its loads) and ``server`` (a producer rank serving reads of its
``leases``, setting sessions up with ``session_setup``). Nothing here is
imported by the package itself: each layer imports only what it uses.
"""
