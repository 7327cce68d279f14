"""pdserve: prefill/decode disaggregated serving on top of vLLM."""

__version__ = "0.1.0"

# The wire protocol changes independently of the package version; peers with
# different protocol versions refuse each other at handshake.
# 2: the server greets every connection (ServerHello, optional KV secret).
# 3: typed leases with producer epochs; reads carry the prompt hash;
#    releases are one-way; reads are answered in order on one connection.
PROTOCOL_VERSION = 4
