#!/usr/bin/env python3
"""Verify a JWT minted by mayfly with PyJWT, as any relying party would: fetch the
issuer's discovery document, then its JWKS, pick the key by `kid`, check the signature,
`iss`, `aud` and `exp`. Nothing from mayfly's code is used.

  verify_jwt.py ISSUER_URL CA_FILE AUDIENCE < token     prints the claims as JSON
"""

import json
import ssl
import sys
import urllib.request

import jwt  # PyJWT

issuer, ca_file, audience = sys.argv[1:4]
context = ssl.create_default_context(cafile=ca_file)
with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", context=context, timeout=10) as r:
    discovery = json.load(r)
if discovery["issuer"] != issuer:
    sys.exit(f"verify_jwt: discovery names issuer {discovery['issuer']!r}, expected {issuer!r}")
token = sys.stdin.read().strip()
keys = jwt.PyJWKClient(discovery["jwks_uri"], ssl_context=context, timeout=10)
key = keys.get_signing_key_from_jwt(token)
claims = jwt.decode(
    token,
    key.key,
    algorithms=discovery["id_token_signing_alg_values_supported"],
    audience=audience,
    issuer=issuer,
    options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
)
print(json.dumps(claims, sort_keys=True))
