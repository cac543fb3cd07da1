"""The p2pkv directory: a small ZeroMQ service that knows which instance holds which chunk keys.

It stores *who has what*, never KV bytes. ``protocol`` is the wire format, ``index`` the pure
data structure, ``server`` the ROUTER loop, ``client`` the DEALER used by the connector's
scheduler side, the router and ``p2pkv status``; ``cli`` wires the subcommands.
Nothing is imported here so that importing one piece stays cheap.
"""
