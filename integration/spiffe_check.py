#!/usr/bin/env python3
"""Check mayfly's SPIFFE Workload API with an independent client: py-spiffe.

The endpoint comes from SPIFFE_ENDPOINT_SOCKET (``unix:///abs/path``). Each
subcommand prints one JSON line and exits 0 when every check holds; otherwise
it prints ``spiffe_check: <reason>`` on stderr and exits 1 (2 for bad usage).

  x509           FetchX509SVID via py-spiffe. The default SVID must chain to the
                 X.509 bundle of its own trust domain (each signature verified
                 with `cryptography`), be inside its validity period, carry its
                 SPIFFE ID as its only URI SAN, and come with the private key of
                 its leaf's public key.
  jwt AUDIENCE   FetchJWTSVID for AUDIENCE; ValidateJWTSVID must accept it (and
                 its response must name the same SPIFFE ID and audience); it must
                 also verify locally against FetchJWTBundles (kid, alg, aud, exp).
  watch SECONDS  Stream FetchX509SVID and wait up to SECONDS for an update whose
                 leaf serial differs from the first one (a rotation push).
  nometa         Raw gRPC FetchX509SVID WITHOUT the `workload.spiffe.io: true`
                 header; the server must answer INVALID_ARGUMENT.
  hold SECONDS   Stream FetchX509SVID, print the first SVID's serial at once (one JSON
                 line, flushed), then wait up to SECONDS for the server to withdraw it
                 (the stream errs: revocation); print {"withdrawn": true, ...}.
  validate AUDIENCE TOKENFILE
                 ValidateJWTSVID on the token in TOKENFILE; prints {"valid": bool,
                 "reason": ...}; exits 0 either way (the caller checks which).
  fetchjwt AUDIENCE TOKENFILE
                 FetchJWTSVID and write the token (only) to TOKENFILE, mode 0600.

Set up: python3 -m venv .venv && .venv/bin/pip install 'spiffe==0.3.2' cryptography
"""

import datetime
import json
import os
import queue
import signal
import sys
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, WorkloadApiClient
from spiffe._proto import workload_pb2  # py-spiffe's generated messages

CALL_TIMEOUT = 10.0  # seconds, for each one-shot Workload API call


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def client():
    return WorkloadApiClient(default_timeout=CALL_TIMEOUT)  # reads SPIFFE_ENDPOINT_SOCKET


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------- x509

def check_svid(svid, bundle):
    """Verify an X509Svid against an X509Bundle; return a summary dict."""
    chain = svid.cert_chain
    leaf = chain[0]
    spiffe_id = str(svid.spiffe_id)

    check(bundle is not None, f"no X.509 bundle for trust domain {svid.spiffe_id.trust_domain}")
    check(bundle.trust_domain == svid.spiffe_id.trust_domain,
          f"{spiffe_id} is not in trust domain {bundle.trust_domain}")

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    check(uris == [spiffe_id], f"leaf URI SANs {uris} != [{spiffe_id}]")

    now = now_utc()
    for i, cert in enumerate(chain):
        check(cert.not_valid_before_utc <= now <= cert.not_valid_after_utc,
              f"chain[{i}] of {spiffe_id} is outside its validity period")

    # Each certificate is issued by the next; the last by a bundle authority.
    for child, parent in zip(chain, chain[1:]):
        child.verify_directly_issued_by(parent)
    top = chain[-1]
    authorities = list(bundle.x509_authorities)
    check(authorities, "the X.509 bundle is empty")
    for ca in authorities:
        try:
            top.verify_directly_issued_by(ca)
            break
        except Exception:
            continue
    else:
        raise CheckFailed(f"chain[{len(chain) - 1}] of {spiffe_id} is not signed by any of the "
                          f"{len(authorities)} authorities in the {bundle.trust_domain} bundle")

    def spki(public_key):
        return public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    check(spki(svid.private_key.public_key()) == spki(leaf.public_key()),
          "private key does not match the leaf certificate's public key")

    return {
        "spiffe_id": spiffe_id,
        "serial": format(leaf.serial_number, "x"),
        "not_after": int(leaf.not_valid_after_utc.timestamp()),
        "chain_len": len(chain),
    }


def check_context(context):
    svid = context.default_svid
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    return check_svid(svid, bundle)


def cmd_x509():
    with client() as c:
        return check_context(c.fetch_x509_context())


# ---------------------------------------------------------------- jwt

def cmd_jwt(audience):
    with client() as c:
        svid = c.fetch_jwt_svid({audience})  # py-spiffe checks alg/typ/aud/exp/sub here
        token = svid.token

        # Through the Workload API. py-spiffe discards the response and re-parses
        # the token, so also look at the response ourselves.
        c.validate_jwt_svid(token, audience)
        channel = grpc.insecure_channel(endpoint_target())
        try:
            validate = channel.unary_unary(
                "/SpiffeWorkloadAPI/ValidateJWTSVID",
                request_serializer=workload_pb2.ValidateJWTSVIDRequest.SerializeToString,
                response_deserializer=workload_pb2.ValidateJWTSVIDResponse.FromString)
            reply = validate(workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
                             metadata=[("workload.spiffe.io", "true")], timeout=CALL_TIMEOUT)
        finally:
            channel.close()
        check(reply.spiffe_id == str(svid.spiffe_id),
              f"ValidateJWTSVID said {reply.spiffe_id!r} for a token of {svid.spiffe_id}")
        claims = dict(reply.claims)
        aud_claim = claims.get("aud")
        aud_claim = [aud_claim] if isinstance(aud_claim, str) else list(aud_claim or [])
        check(audience in aud_claim, f"ValidateJWTSVID claims aud {aud_claim} lack {audience!r}")
        check(claims.get("sub") == str(svid.spiffe_id), "ValidateJWTSVID claims sub differs")

        # Locally, against the JWT bundle of the subject's trust domain.
        bundles = c.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        check(bundle is not None, f"no JWT bundle for trust domain {svid.spiffe_id.trust_domain}")
        local = JwtSvid.parse_and_validate(token, bundle, {audience})
        check(local.spiffe_id == svid.spiffe_id, "locally verified token names another SPIFFE ID")

        return {
            "spiffe_id": str(local.spiffe_id),
            "aud": sorted(local.audience),
            "exp": int(local.expiry),
            "validated": True,
        }


# ---------------------------------------------------------------- watch

def cmd_watch(seconds):
    deadline = time.monotonic() + seconds
    updates = queue.Queue()
    with client() as c:
        # retry_connect=False: a stream error or end is reported, not retried.
        handle = c.stream_x509_contexts(on_success=lambda ctx: updates.put(("ok", ctx)),
                                        on_error=lambda err: updates.put(("error", err)),
                                        retry_connect=False)
        try:
            first = None
            while True:
                remaining = deadline - time.monotonic()
                try:
                    kind, item = updates.get(timeout=max(remaining, 0))
                except queue.Empty:
                    serial = first["serial"] if first else "none"
                    raise CheckFailed(f"no rotation within {seconds}s (first serial {serial})")
                if kind == "error":
                    raise CheckFailed(f"X.509 stream failed: {item}")
                summary = check_context(item)
                if first is None:
                    first = summary
                elif summary["serial"] != first["serial"]:
                    check(summary["spiffe_id"] == first["spiffe_id"],
                          f"rotation changed identity: {first['spiffe_id']} -> {summary['spiffe_id']}")
                    return {
                        "first": first["serial"],
                        "rotated": summary["serial"],
                        "first_not_after": first["not_after"],
                        "rotated_at": int(time.time()),
                    }
        finally:
            handle.cancel()


# ---------------------------------------------------------------- revocation

def cmd_hold(seconds):
    deadline = time.monotonic() + seconds
    updates = queue.Queue()
    with client() as c:
        handle = c.stream_x509_contexts(on_success=lambda ctx: updates.put(("ok", ctx)),
                                        on_error=lambda err: updates.put(("error", err)),
                                        retry_connect=False)
        try:
            first = None
            while True:
                remaining = deadline - time.monotonic()
                try:
                    kind, item = updates.get(timeout=max(remaining, 0))
                except queue.Empty:
                    raise CheckFailed(f"the SVID was not withdrawn within {seconds}s")
                if kind == "error":
                    check(first is not None, f"the stream failed before any SVID: {item}")
                    return {"withdrawn": True, "serial": first["serial"], "error": str(item)[:200]}
                summary = check_context(item)
                if first is None:
                    first = summary
                    print(json.dumps({"holding": summary["serial"], "spiffe_id": summary["spiffe_id"]}), flush=True)
        finally:
            handle.cancel()


def cmd_validate(audience, token_file):
    with open(token_file) as f:
        token = f.read().strip()
    with client() as c:
        try:
            c.validate_jwt_svid(token, audience)
            return {"valid": True}
        except Exception as err:
            return {"valid": False, "reason": str(err)[:300]}


def cmd_fetchjwt(audience, token_file):
    with client() as c:
        svid = c.fetch_jwt_svid({audience})
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(svid.token)
    return {"spiffe_id": str(svid.spiffe_id)}


# ---------------------------------------------------------------- nometa

def endpoint_target():
    endpoint = os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    check(endpoint.startswith("unix:"), f"SPIFFE_ENDPOINT_SOCKET must be unix:///path, got {endpoint!r}")
    return endpoint  # gRPC accepts unix:///abs/path as it is


def cmd_nometa():
    channel = grpc.insecure_channel(endpoint_target())  # no header interceptor
    try:
        fetch = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")  # raw bytes in and out
        try:
            next(iter(fetch(b"", timeout=CALL_TIMEOUT)))  # empty X509SVIDRequest
            code = "OK"
        except grpc.RpcError as err:
            code = err.code().name
    finally:
        channel.close()
    print(code)
    check(code == "INVALID_ARGUMENT", f"expected INVALID_ARGUMENT without the header, got {code}")
    return None


# ---------------------------------------------------------------- main

def main(argv):
    commands = {
        ("x509", 0): lambda: cmd_x509(),
        ("jwt", 1): lambda: cmd_jwt(argv[1]),
        ("watch", 1): lambda: cmd_watch(int(argv[1])),
        ("nometa", 0): lambda: cmd_nometa(),
        ("hold", 1): lambda: cmd_hold(int(argv[1])),
        ("validate", 2): lambda: cmd_validate(argv[1], argv[2]),
        ("fetchjwt", 2): lambda: cmd_fetchjwt(argv[1], argv[2]),
    }
    run = commands.get((argv[0], len(argv) - 1)) if argv else None
    if run is None or (argv[0] in ("watch", "hold") and not argv[1].isdigit()):
        print("usage: spiffe_check.py x509 | jwt AUDIENCE | watch SECONDS | nometa | hold SECONDS"
              " | validate AUDIENCE TOKENFILE | fetchjwt AUDIENCE TOKENFILE", file=sys.stderr)
        return 2

    # Hard bound on the whole run, whatever the library does.
    budget = 60 + (int(argv[1]) if argv[0] in ("watch", "hold") else 0)

    def out_of_time(signum, frame):
        raise CheckFailed(f"gave up after {budget}s")
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(budget)

    try:
        result = run()
    except Exception as err:  # report every failure the same way
        print(f"spiffe_check: {argv[0]}: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    if result is not None:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
