"""Loaded by every Python process a test starts with this folder on PYTHONPATH (and FEDSECURE_NET_LOG set).

It records, through an audit hook (PEP 578), every name lookup and every connect attempt the process makes, one
JSON line each in FEDSECURE_NET_LOG; the test then checks that none of them leaves loopback. An attempt is
recorded before it can fail, so a lookup that this machine's closed network would refuse still counts.
"""

import json
import os
import sys

_LOG = os.environ.get("FEDSECURE_NET_LOG")

if _LOG:
    def _record(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo":
            target = [args[0], args[1]]
        elif event in ("socket.connect", "socket.sendto"):
            addr = args[1] if event == "socket.connect" else args[-1]
            target = list(addr) if isinstance(addr, tuple) else [str(addr)]
        else:
            return
        host = target[0]
        if isinstance(host, bytes):
            host = host.decode(errors="replace")
        line = {"pid": os.getpid(), "argv": " ".join(sys.argv[:2])[-120:], "event": event,
                "host": host if isinstance(host, str) or host is None else str(host),
                "port": target[1] if len(target) > 1 and isinstance(target[1], int | str) else None}
        try:
            with open(_LOG, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            pass

    sys.addaudithook(_record)
