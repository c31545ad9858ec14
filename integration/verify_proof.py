#!/usr/bin/env python3
"""Verify a `mayfly audit prove` inclusion proof offline, trusting only the checkpoint
signer's Ed25519 public key. Written outside the crate from the specifications it cites,
so it checks mayfly rather than repeating it:

  - the event: its hash recomputed from its fields (mayfly's chain rule: SHA-256 over the
    previous hash, seq, at_ms, kind and body, each prefixed by its big-endian u64 length);
    it is an `issued` event of the credential asked about;
  - the leaf: SHA-256(0x00 || event hash), RFC 6962 section 2.1;
  - the audit path: RFC 9162 section 2.1.3.2 (inclusion proof verification) up to a root;
  - the checkpoint: a C2SP tlog-checkpoint (origin, size, base64 root) in a C2SP signed
    note whose Ed25519 signature line names the origin and the key id
    SHA-256(name || 0x0A || 0x01 || public key)[:4]; its size and root match the proof.

usage: verify_proof.py PROOF.json PUBLIC_KEY.pem [CREDENTIAL_ID]
Prints one line and exits 0 when the proof holds; 1 naming the first failure.
"""
import base64
import hashlib
import json
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key


def fail(why):
    print(f"proof FAILED: {why}")
    sys.exit(1)


def event_hash(e):
    h = hashlib.sha256()
    for part in (e["prev_hash"].encode(), e["seq"].to_bytes(8, "big", signed=True),
                 e["at_ms"].to_bytes(8, "big", signed=True), e["kind"].encode(), e["body"].encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def node(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_path(leaf, index, size, path):
    """RFC 9162 2.1.3.2."""
    if index >= size:
        fail(f"leaf index {index} is outside a tree of {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            fail("the audit path is longer than the tree allows")
        if fn % 2 == 1 or fn == sn:
            r = node(p, r)
            if fn % 2 == 0:
                while fn % 2 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        fail("the audit path is shorter than the tree needs")
    return r


def open_note(note, key):
    text, sep, signatures = note.partition("\n\n")
    if not sep:
        fail("the checkpoint has no signature block")
    body = (text + "\n").encode()
    lines = text.split("\n")
    if len(lines) < 3:
        fail("the checkpoint lacks origin, size or root")
    origin, size, root = lines[0], lines[1], lines[2]
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = hashlib.sha256(origin.encode() + b"\n\x01" + raw).digest()[:4]
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            continue
        name, _, blob = line[2:].partition(" ")
        try:
            blob = base64.b64decode(blob, validate=True)
        except ValueError:
            continue
        if name != origin or len(blob) != 68 or blob[:4] != key_id:
            continue
        try:
            key.verify(blob[4:], body)
        except InvalidSignature:
            fail("the checkpoint's signature does not verify with this key")
        return origin, int(size), base64.b64decode(root), lines[3:]
    fail("no signature line for this origin and key id")


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    proof = json.load(open(sys.argv[1]))
    key = load_pem_public_key(open(sys.argv[2], "rb").read())
    if not isinstance(key, Ed25519PublicKey):
        fail("the key is not Ed25519")
    wanted = sys.argv[3] if len(sys.argv) == 4 else proof["credential_id"]

    e = proof["event"]
    if event_hash(e) != e["hash"]:
        fail(f"event {e['seq']}: its hash does not match its fields")
    if e["kind"] != "issued":
        fail(f"event {e['seq']} is `{e['kind']}`, not `issued`")
    if json.loads(e["body"]).get("id") != wanted:
        fail(f"event {e['seq']} issued another credential than `{wanted}`")
    index = proof["leaf_index"]
    if index != e["seq"] - 1:
        fail(f"leaf {index} is not the place of event {e['seq']}")

    origin, size, signed_root, extensions = open_note(proof["checkpoint"], key)
    if size != proof["tree_size"]:
        fail(f"the proof is for a tree of {proof['tree_size']}, the checkpoint signs {size}")
    leaf = hashlib.sha256(b"\x00" + bytes.fromhex(e["hash"])).digest()
    root = root_from_path(leaf, index, size, [bytes.fromhex(p) for p in proof["proof"]])
    if root != signed_root:
        fail("the audit path does not lead to the signed root")
    print(f"ok: credential {wanted} (event {e['seq']}) is leaf {index} of the {size}-event tree "
          f"{origin} signed{' (final)' if 'mayfly-final' in extensions else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
