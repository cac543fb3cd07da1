"""A stand-in for `vllm serve` / `p2pkv router` in the launcher tests: records how it was
started (argv, a few env vars, pid) in $P2PKV_FAKE_OUT/<label>-<pid>.json, then waits for
SIGTERM. Usage: fake_server.py LABEL [args...]."""

import json
import os
import signal
import sys
import threading
from pathlib import Path

label = sys.argv[1]
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
out = Path(os.environ["P2PKV_FAKE_OUT"])
out.mkdir(parents=True, exist_ok=True)
record = {"label": label, "pid": os.getpid(), "argv": sys.argv[2:],
          "env": {k: v for k, v in os.environ.items()
                  if k in ("CUDA_VISIBLE_DEVICES", "UCX_TLS", "UCX_NET_DEVICES")}}
tmp = out / f".{label}-{os.getpid()}.tmp"
tmp.write_text(json.dumps(record))
tmp.replace(out / f"{label}-{os.getpid()}.json")
stop.wait(120)  # a test that forgets us cannot leave us behind for long
