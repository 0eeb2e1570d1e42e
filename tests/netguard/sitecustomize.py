"""Loaded by every Python process a test starts with this folder on PYTHONPATH; the test process installs it too.

It records, through an audit hook (PEP 578), every name lookup and every connect attempt the process makes while
FEDSECURE_NET_LOG names a file, one JSON line each; the test then checks that none of them leaves loopback (see
tests/net.py). An attempt is recorded before it can fail, so a lookup this machine's closed network would refuse
still counts. Then any attempt beyond loopback is refused (OSError), so that even on a machine with a network a
test never lets one out.
"""

import json
import os
import sys


def _record(event: str, args: tuple) -> None:
    if event not in ("socket.getaddrinfo", "socket.connect", "socket.sendto"):
        return
    log = os.environ.get("FEDSECURE_NET_LOG")
    if not log:
        return
    if event == "socket.getaddrinfo":
        host, port = args[0], args[1]
    else:
        addr = args[1] if event == "socket.connect" else args[-1]
        host, port = (addr[0], addr[1]) if isinstance(addr, tuple) and len(addr) >= 2 else (addr, None)
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    line = {"pid": os.getpid(), "argv": " ".join(sys.argv[:2])[-120:], "event": event,
            "host": host if host is None or isinstance(host, str) else str(host),
            "port": port if isinstance(port, int | str) or port is None else str(port)}
    try:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError:
        pass
    h = line["host"]
    if not (h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "", None)
            or (isinstance(h, str) and h.startswith(("127.", "/", "\0", "@")))):
        raise OSError(f"tests/netguard: {event} to {h!r} refused (a test lets nothing leave loopback)")


if not getattr(sys, "_fedsecure_netguard", False):
    sys._fedsecure_netguard = True
    sys.addaudithook(_record)
