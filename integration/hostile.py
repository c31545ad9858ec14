#!/usr/bin/env python3
"""Hostile clients of a running mayfly daemon, each bounded in count and time (standard
library only; used by integration/suites/hostile.sh and bench/hostile).

  hostile.py header-frame SOCKET SIZE        one HEADERS frame announcing SIZE bytes, sent whole
  hostile.py amplify SOCKET BYTES            a header block of BYTES: one 4,000-byte table entry,
                                             then 1-byte references to it (HEADERS + CONTINUATIONs)
  hostile.py idle SOCKET N SECONDS           N connections that send nothing, held SECONDS;
                                             prints how many the daemon accepted and kept open
  hostile.py trickle HOST:PORT N SECONDS     N TLS connections each sending a POST head, then its
                                             body a byte a second, for SECONDS; prints how many
                                             got an answer or were closed, and the statuses
  hostile.py rss PID                         the process's VmRSS and VmHWM (KiB)

Every command prints one JSON line. Connections are to loopback or a Unix socket only.
"""
import json
import os
import resource
import select
import socket
import ssl
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, CONTINUATION, SETTINGS = 0x1, 0x9, 0x4
END_HEADERS = 0x4


def frame(kind, flags, stream, payload, length=None):
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def hpack_int(first, prefix, n):
    top = (1 << prefix) - 1
    if n < top:
        return bytes([first | n])
    out = [first | top]
    n -= top
    while n >= 128:
        out.append((n % 128) | 0x80)
        n //= 128
    out.append(n)
    return bytes(out)


def literal_indexed(name, value):
    return b"\x40" + hpack_int(0, 7, len(name)) + name + hpack_int(0, 7, len(value)) + value


def raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(max(soft, n), hard) if hard != resource.RLIM_INFINITY else max(soft, n)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def unix(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.settimeout(None)
    return s


def until_closed(s, seconds):
    """Reads until the peer closes (True) or `seconds` pass (False); the bytes read are dropped."""
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)
    while time.monotonic() < deadline:
        if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            continue
        try:
            if not s.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


def send_all(s, data):
    try:
        s.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def header_frame(path, size):
    s = unix(path)
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    block = b"\x82" * size  # `:method GET`, repeated
    sent = send_all(s, frame(HEADERS, END_HEADERS, 1, block))
    closed = until_closed(s, 10)
    s.close()
    return {"attack": "header-frame", "bytes": size, "sent_whole": sent, "closed_by_daemon": closed}


def amplify(path, size):
    s = unix(path)
    s.sendall(PREFACE + frame(SETTINGS, 0, 0, b""))
    block = literal_indexed(b"x-fill", b"a" * 4000)
    block += bytes([0x80 | 62]) * (size - len(block))
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    out = b""
    for i, chunk in enumerate(chunks):
        last = END_HEADERS if i == len(chunks) - 1 else 0
        out += frame(HEADERS if i == 0 else CONTINUATION, last, 1, chunk)
    sent = send_all(s, out)
    closed = until_closed(s, 10)
    s.close()
    refs = size - len(literal_indexed(b"x-fill", b"a" * 4000))
    return {"attack": "amplify", "bytes": size, "decodes_to_bytes": refs * 4038, "sent_whole": sent,
            "closed_by_daemon": closed}


def idle(path, n, seconds):
    raise_nofile(n + 64)
    conns, failed = [], 0
    for _ in range(n):
        try:
            conns.append(unix(path))
        except OSError:
            failed += 1
    # A connection the daemon refused is closed at once; one it kept stays open until its
    # header deadline. Count both after a short settle, then hold the rest.
    time.sleep(1.0)
    open_after_accept = sum(1 for c in conns if not _eof(c))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    open_at_end = sum(1 for c in conns if not _eof(c))
    for c in conns:
        c.close()
    return {"attack": "idle", "connections": n, "connect_failed": failed, "open_after_1s": open_after_accept,
            "open_after_hold": open_at_end, "held_seconds": seconds}


def _eof(s):
    """Whether the daemon closed `s` (what it sent before, e.g. its SETTINGS, is read and dropped)."""
    try:
        while True:
            if s.recv(65536, socket.MSG_DONTWAIT) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def trickle(hostport, n, seconds):
    raise_nofile(n + 64)
    host, port = hostport.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    conns, failed = [], 0
    head = (b"POST /v1/exchange HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: 1000\r\n\r\n")
    for _ in range(n):
        try:
            raw = socket.create_connection((host, int(port)), timeout=10)
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(head)
            tls.setblocking(False)
            conns.append(tls)
        except (OSError, ssl.SSLError):
            failed += 1
    statuses, closed = {}, set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(closed) < len(conns):
        for i, c in enumerate(conns):
            if i in closed:
                continue
            try:
                c.send(b"{")
            except (OSError, ssl.SSLError):
                closed.add(i)
                continue
            try:
                data = c.recv(256)
                if not data:
                    closed.add(i)
                elif data.startswith(b"HTTP/1.1 "):
                    code = data[9:12].decode()
                    statuses[code] = statuses.get(code, 0) + 1
                    closed.add(i)
            except ssl.SSLWantReadError:
                pass
            except (OSError, ssl.SSLError):
                closed.add(i)
        time.sleep(1.0)
    for c in conns:
        try:
            c.close()
        except OSError:
            pass
    return {"attack": "trickle", "connections": n, "connect_failed": failed, "answered_or_closed": len(closed),
            "statuses": statuses, "held_seconds": seconds}


def rss(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                fields[k] = int(v.split()[0])
    return {"pid": int(pid), "rss_kib": fields.get("VmRSS"), "peak_kib": fields.get("VmHWM")}


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "header-frame":
        out = header_frame(args[0], int(args[1]))
    elif cmd == "amplify":
        out = amplify(args[0], int(args[1]))
    elif cmd == "idle":
        out = idle(args[0], int(args[1]), float(args[2]))
    elif cmd == "trickle":
        out = trickle(args[0], int(args[1]), float(args[2]))
    elif cmd == "rss":
        out = rss(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
