"""The p2pkv directory: a small ZeroMQ service that knows which instance holds which chunk keys.

It stores *who has what*, never KV bytes. ``protocol`` is the wire format (and the liveness
constants), ``index`` the server's pure data structure, ``server`` the ROUTER loop. ``client``
is the DEALER used by the connector and ``p2pkv status``; ``registration`` and ``lookups`` are
its pure state (the registration state machine, the lookups in flight). ``feed`` is the
change-feed replica the router keeps; ``cli`` the subcommands and the directory's process
(``python -m p2pkv.directory``). Nothing is imported here so that importing one piece stays
cheap.
"""
