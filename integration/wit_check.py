"""An independent WIT-SVID client and relying party for integration/suites/wit.sh.

The Workload API is reached with grpcio and stubs that grpcio-tools generates from the
SPIFFE proto (proto/spiffe/workload.proto) into STUBS (an argument of `gen`, then the
environment variable WIT_STUBS); PyJWT (with `cryptography`) verifies WITs against the
fetched WIT bundle and signs Workload Proof Tokens with the WIT's key. Nothing here is
mayfly's code.

  wit_check.py gen STUBS                  generate the stubs
  wit_check.py fetch DIR                  FetchWITSVID + FetchWITBundles: DIR/wit.jwt, key.jwk, bundle.json
  wit_check.py check DIR                  verify DIR's WIT against DIR/bundle.json (header, claims, signature, cnf = key)
  wit_check.py sign DIR AUD [opts]        a WPT for DIR's WIT (--other-key, --exp-in S, --wth X, --jti J)
  wit_check.py verify-wpt DIR WPT AUD     verify a WPT (e.g. `mayfly wpt sign`'s) with the cnf key
  wit_check.py hold SECONDS               hold a FetchWITSVID stream; report when the WIT is withdrawn
`sign` prints the proof; the others one JSON line. Exit 0 when the check holds.
"""

import base64
import hashlib
import json
import os
import sys
import time
import uuid

SOCKET = os.environ.get("SPIFFE_ENDPOINT_SOCKET", "").removeprefix("unix://")
META = [("workload.spiffe.io", "true")]


def out(obj, ok=True):
    print(json.dumps(obj), flush=True)
    sys.exit(0 if ok else 1)


def stubs():
    sys.path.insert(0, os.environ["WIT_STUBS"])
    import grpc  # noqa: E402
    import workload_pb2  # noqa: E402
    import workload_pb2_grpc  # noqa: E402

    channel = grpc.insecure_channel("unix:" + SOCKET)
    return grpc, workload_pb2, workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)


def gen(target):
    import grpc_tools
    from grpc_tools import protoc

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(target, exist_ok=True)
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", "-I", os.path.join(root, "proto/spiffe"), "-I", include,
                      f"--python_out={target}", f"--grpc_python_out={target}", "workload.proto"])
    out({"generated": sorted(os.listdir(target))}, rc == 0)


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fetch(d):
    grpc, pb, stub = stubs()
    os.makedirs(d, exist_ok=True)
    svids = stub.FetchWITSVID(pb.WITSVIDRequest(), metadata=META, timeout=30)
    first = next(svids)
    svids.cancel()
    svid = first.svids[0]
    with open(os.path.join(d, "wit.jwt"), "w") as f:
        f.write(svid.wit_svid)
    fd = os.open(os.path.join(d, "key.jwk"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(svid.wit_svid_key)
    bundles = stub.FetchWITBundles(pb.WITBundlesRequest(), metadata=META, timeout=30)
    b = next(bundles)
    bundles.cancel()
    with open(os.path.join(d, "bundle.json"), "w") as f:
        f.write(b.bundles["spiffe://mayfly.local"])
    out({"spiffe_id": svid.spiffe_id, "trust_domains": sorted(b.bundles.keys())})


def load(d, name):
    with open(os.path.join(d, name)) as f:
        return f.read().strip()


def check(d):
    import jwt
    from jwt.algorithms import ECAlgorithm

    wit, bundle, key = load(d, "wit.jwt"), json.loads(load(d, "bundle.json")), json.loads(load(d, "key.jwk"))
    header = jwt.get_unverified_header(wit)
    problems = []
    if header.get("typ") != "wit+jwt":
        problems.append(f"typ {header.get('typ')}")
    if header.get("alg") != "ES256":
        problems.append(f"alg {header.get('alg')}")
    kid = header.get("kid")
    keys = [k for k in bundle["keys"] if k.get("kid") == kid and k.get("use") == "wit-svid"]
    if not kid or len(keys) != 1:
        out({"error": f"kid {kid!r} is not a wit-svid key of the bundle"}, False)
    public = ECAlgorithm.from_jwk(json.dumps(keys[0]))
    claims = jwt.decode(wit, public, algorithms=["ES256"],
                        options={"require": ["exp", "sub"], "verify_aud": False})
    if "aud" in claims:
        problems.append("aud present")
    if claims["sub"] != "spiffe://mayfly.local/dev/quickstart":
        problems.append(f"sub {claims['sub']}")
    cnf = claims.get("cnf", {}).get("jwk", {})
    if cnf.get("alg") != "ES256" or "d" in cnf:
        problems.append(f"cnf.jwk {cnf}")
    private = ECAlgorithm.from_jwk(json.dumps(key))
    numbers = private.public_key().public_numbers()
    if b64(numbers.x.to_bytes(32, "big")) != cnf.get("x") or b64(numbers.y.to_bytes(32, "big")) != cnf.get("y"):
        problems.append("the handed-out key is not the key in cnf.jwk")
    out({"kid": kid, "sub": claims["sub"], "exp": claims["exp"], "jti": claims.get("jti"), "problems": problems},
        not problems)


def sign(d, aud, args):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    wit = load(d, "wit.jwt")
    if "--other-key" in args:
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        key = ECAlgorithm.from_jwk(load(d, "key.jwk"))
    opt = lambda name, default: args[args.index(name) + 1] if name in args else default  # noqa: E731
    now = int(time.time())
    claims = {
        "aud": aud,
        "iat": now,
        "exp": now + int(opt("--exp-in", "60")),
        "jti": opt("--jti", str(uuid.uuid4())),
        "wth": opt("--wth", b64(hashlib.sha256(wit.encode()).digest())),
    }
    print(jwt.encode(claims, key, algorithm="ES256", headers={"typ": "wpt+jwt"}))


def verify_wpt(d, wpt, aud):
    import jwt
    from jwt.algorithms import ECAlgorithm

    wit = load(d, "wit.jwt")
    cnf = jwt.decode(wit, options={"verify_signature": False})["cnf"]["jwk"]
    header = jwt.get_unverified_header(wpt)
    claims = jwt.decode(wpt, ECAlgorithm.from_jwk(json.dumps(cnf)), algorithms=[cnf["alg"]], audience=aud,
                        options={"require": ["exp", "jti", "aud"]})
    ok = header.get("typ") == "wpt+jwt" and claims["wth"] == b64(hashlib.sha256(wit.encode()).digest())
    out({"typ": header.get("typ"), "aud": claims["aud"], "exp_in": claims["exp"] - int(time.time())}, ok)


def hold(seconds):
    grpc, pb, stub = stubs()
    stream = stub.FetchWITSVID(pb.WITSVIDRequest(), metadata=META, timeout=float(seconds))
    held, withdrawn = None, False
    try:
        for message in stream:
            if held is None:
                held = json.loads(base64.urlsafe_b64decode(message.svids[0].wit_svid.split(".")[1] + "=="))["jti"]
                print(json.dumps({"holding": held}), flush=True)
            elif not message.svids:
                withdrawn = True
                print(json.dumps({"withdrawn": True, "jti": held}), flush=True)
    except grpc.RpcError as e:
        print(json.dumps({"ended": str(e.code()), "details": e.details()}), flush=True)
        sys.exit(0 if withdrawn and e.code() == grpc.StatusCode.PERMISSION_DENIED else 1)
    sys.exit(1)


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "gen":
        gen(rest[0])
    elif cmd == "fetch":
        fetch(rest[0])
    elif cmd == "check":
        check(rest[0])
    elif cmd == "sign":
        sign(rest[0], rest[1], rest[2:])
    elif cmd == "verify-wpt":
        verify_wpt(rest[0], rest[1], rest[2])
    elif cmd == "hold":
        hold(rest[0])
    else:
        sys.exit(f"unknown command {cmd}")
