"""A hostile client for the bounded-server tests: holds N TCP connections to an address that
never say a word, reopens the ones the server closes, and writes how many it holds to a
ready file once the first N are open. Runs until killed.

    python -m tests.flood_process READY_FILE HOST:PORT N [SOURCE_ADDRESS]

SOURCE_ADDRESS (e.g. 127.0.0.2, which is loopback too): connect from there, as an attacker
on another host would.
"""

import os
import selectors
import socket
import sys
import time


def main() -> None:
    ready, address, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    host, port = address.rsplit(":", 1)
    source = sys.argv[4] if len(sys.argv) > 4 else ""
    sel = selectors.DefaultSelector()
    opened = 0

    def open_one() -> None:
        nonlocal opened
        s = socket.socket()
        if source:
            s.bind((source, 0))
        s.setblocking(False)
        s.connect_ex((host, int(port)))
        sel.register(s, selectors.EVENT_READ)
        opened += 1

    for _ in range(n):
        open_one()
    with open(ready + ".tmp", "w") as f:
        f.write(str(n))
    os.replace(ready + ".tmp", ready)
    while True:
        closed = 0
        for key, _ in sel.select(0.05):
            s = key.fileobj
            try:
                if s.recv(4096):  # the hello: read it, answer nothing
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            sel.unregister(s)
            s.close()
            closed += 1
        for _ in range(closed):  # as fast as the server closes them
            open_one()
        with open(ready + ".opened.tmp", "w") as f:
            f.write(str(opened))
        os.replace(ready + ".opened.tmp", ready + ".opened")
        time.sleep(0.01)


if __name__ == "__main__":
    main()
