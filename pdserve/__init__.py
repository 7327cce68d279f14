"""pdserve: prefill/decode disaggregated serving on top of vLLM."""

__version__ = "0.1.0"

# The wire protocol changes independently of the package version; peers with
# different protocol versions refuse each other at handshake.
# 2: the server greets every connection (ServerHello, optional KV secret).
# 3: typed leases with producer epochs; reads carry the prompt hash;
#    releases are one-way; reads are answered in order on one connection.
# 4: ranks of different TP sizes: a read may name a run of KV heads, a
#    release how many consumer ranks must release; rank info tells each
#    layer's head dim and the model's KV heads.
# 5: with a KV secret the producer proves it too (both nonces, AuthProof /
#    ServerProof) and every later frame, a tcp payload included (PayloadEnd),
#    carries a tag under per-direction keys; a release names its consumer
#    rank (counted once).
# 6: the producer instance is ``instance_id`` in rank info and leases (was
#    ``epoch``), the name /pdserve/metadata gives it.
PROTOCOL_VERSION = 6
