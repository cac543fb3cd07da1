"""Data plane: pulls KV chunk bytes straight from the peer that holds them.

Layout (each module imports only those above it in this list):

- ``wire``, ``sockio``: the framing and blocking-socket helpers;
- ``base``: the ``Transport`` interface, ``PullItem``/``PullResult``, the destination
  ``Piece`` types, ``TransportChoice`` and its per-pull path rule;
- ``land``: scattering a received chunk into its destination pieces;
- ``shm``: the same-host slab path (Pin/Release); ``conn``: connect, handshake, header
  exchange, connection pool; ``stream``: the TCP bytes path; ``ucx``: ``UcxEngine`` and the
  UCX path;
- ``server``: serves one store (Pull, Pin/Release, Send);
- ``peer``: ``PeerTransport``, the one implementation, composed of the above;
- ``choose``: ``choose_transport`` / ``make_transport``, what callers use.
"""
