#!/usr/bin/env python3
"""Look for a workload's private key in the memory of the daemon that sent it.

  fetch OUT       FetchX509SVID over raw gRPC (SPIFFE_ENDPOINT_SOCKET, with the security
                  header), exactly as sent: the key to OUT.key and the certificate to
                  OUT.cert (mode 0600), then close the stream. Prints the SPIFFE ID.
  scan PID KEY CERT CA
                  Read every writable private mapping of PID (/proc/PID/maps, /proc/PID/mem;
                  needs root once the daemon is not dumpable) and count the copies of: the
                  PKCS#8 key as sent, its 32-byte private scalar (big-endian, and byte-reversed
                  as little-endian limbs), the certificate (public; counted, not required:
                  once the stream is closed its buffers may be freed and purged), and the
                  bundle's CA certificate (OUT.ca, also written by fetch), which the daemon
                  holds for its whole life: the control that the scan sees the heap.
                  Prints one JSON line.

Set up: the integration venv with py-spiffe (for its generated messages) and grpcio.
"""

import json
import os
import sys


def fetch(out):
    import grpc
    from spiffe._proto import workload_pb2

    channel = grpc.insecure_channel(os.environ["SPIFFE_ENDPOINT_SOCKET"])
    call = channel.unary_stream(
        "/SpiffeWorkloadAPI/FetchX509SVID",
        request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
        response_deserializer=workload_pb2.X509SVIDResponse.FromString,
    )
    stream = call(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=10.0)
    first = next(iter(stream))
    stream.cancel()
    channel.close()
    svid = first.svids[0]
    for suffix, data in ((".key", svid.x509_svid_key), (".cert", svid.x509_svid), (".ca", first_der(svid.bundle))):
        fd = os.open(out + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    print(svid.spiffe_id)


def first_der(data):
    """The first DER element of concatenated ones (the bundle's first CA certificate)."""
    if len(data) < 2 or data[0] != 0x30:
        raise SystemExit("memscan: the bundle is not DER")
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    n = data[1] & 0x7F
    return data[: 2 + n + int.from_bytes(data[2 : 2 + n], "big")]


def scalar(pkcs8):
    at = pkcs8.find(bytes([0x02, 0x01, 0x01, 0x04, 0x20]))
    if at < 0:
        raise SystemExit("memscan: not a P-256 PKCS#8 key")
    return pkcs8[at + 5 : at + 37]


def regions(pid):
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            perms, name = fields[1], fields[5] if len(fields) > 5 else ""
            if perms.startswith("rw") and perms.endswith("p") and name not in ("[vvar]", "[vsyscall]"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                yield start, end


def scan(pid, key_file, cert_file, ca_file):
    key, cert, ca = (open(f, "rb").read() for f in (key_file, cert_file, ca_file))
    needles = {
        "key_der": key,
        "scalar": scalar(key),
        "scalar_reversed": scalar(key)[::-1],
        "certificate": cert,
        "ca": ca,
    }
    counts = {name: 0 for name in needles}
    longest = max(len(n) for n in needles.values())
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in regions(pid):
            at, tail = start, b""
            while at < end:
                try:
                    mem.seek(at)
                    chunk = mem.read(min(end - at, 1 << 20))
                except OSError:
                    break
                if not chunk:
                    break
                data = tail + chunk
                for name, needle in needles.items():
                    i = data.find(needle)
                    while i >= 0:
                        # Count a match once: those wholly inside the carried-over tail were counted before.
                        if i + len(needle) > len(tail):
                            counts[name] += 1
                        i = data.find(needle, i + 1)
                tail = data[-(longest - 1) :]
                at += len(chunk)
    print(json.dumps(counts))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "fetch":
        fetch(sys.argv[2])
    elif len(sys.argv) == 6 and sys.argv[1] == "scan":
        scan(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        print(__doc__)
        sys.exit(2)
