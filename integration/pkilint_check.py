#!/usr/bin/env python3
"""Lint mayfly's certificates and CRLs with pkilint (PyPI `pkilint`, the DigiCert linter);
exit 0 when no finding of severity ERROR or worse is left after the exemptions below, each
exempted finding printed with the reason it is the linter's mistake.

  cert FILE               lint_pkix_cert (RFC 5280 profile)
  crl FILE                lint_crl -t CRL -p PKIX
  chain ISSUER SUBJECT    lint_pkix_signer_signee_cert_chain (names, key ids, signature)

Exemptions — each applies only to the exact finding and value it names, and only after the
value is checked here against the standard the finding cites:

1. pkix.invalid_uri_syntax on a `spiffe://` URI SAN. pkilint 0.13 checks URI SANs with
   python-validators' url(), which accepts only the schemes ftp, ftps, git, http, https,
   rtsp, sftp, ssh and telnet (validators/url.py, _validate_scheme): every URI of any other
   scheme is "invalid", whatever its syntax. RFC 5280 4.2.1.6 asks for an RFC 3986 URI with
   a scheme and, for URIs with an authority, a host. Exempted only when the value
     a. matches RFC 3986's `URI = scheme ":" hier-part` with hier-part = "//" authority
        path-abempty (no query, fragment, userinfo or port), written out below from the ABNF;
     b. is a valid SPIFFE ID (SPIFFE-ID spec 2.1-2.3: scheme spiffe, a trust domain of
        [a-z0-9.-_], path segments of [A-Za-z0-9.-_], none empty, `.` or `..`, at most 2048
        bytes; a CA's trust-domain ID has no path);
     c. passes the same validators.url() when only the scheme is changed to https — so the
        scheme list is the linter's only objection.
2. pkix.invalid_domain_name_syntax on the dNSName `localhost` (`mayfly dev`'s listener
   certificate). RFC 5280 4.2.1.6 asks for RFC 1034 3.5's preferred name syntax, where a
   domain is one label or several; validators.domain() requires a top-level label after a
   dot. Exempted only for a single label that is a valid RFC 1034 <label> and that
   validators.domain() accepts once a second label is added.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import validators

BIN = Path(sys.executable).parent

# RFC 3986, section 3 and appendix A, for URIs with an authority and no query or fragment.
UNRESERVED = r"[A-Za-z0-9\-._~]"
PCT = r"%[0-9A-Fa-f]{2}"
SUB_DELIMS = r"[!$&'()*+,;=]"
PCHAR = rf"(?:{UNRESERVED}|{PCT}|{SUB_DELIMS}|[:@])"
REG_NAME = rf"(?:{UNRESERVED}|{PCT}|{SUB_DELIMS})*"
RFC3986 = re.compile(rf"^[A-Za-z][A-Za-z0-9+\-.]*://{REG_NAME}(?:/{PCHAR}*)*$")

# SPIFFE-ID spec, sections 2.1-2.3.
SPIFFE = re.compile(r"^spiffe://([a-z0-9.\-_]+)((?:/[A-Za-z0-9.\-_]+)*)$")


def spiffe_uri_reasons(uri):
    """Why a pkix.invalid_uri_syntax finding on `uri` is the linter's mistake, or None."""
    if not uri.startswith("spiffe://") or len(uri.encode()) > 2048:
        return None
    if not RFC3986.match(uri):
        return None
    m = SPIFFE.match(uri)
    if not m or any(seg in (".", "..") for seg in m.group(2).split("/")[1:]):
        return None
    https = "https://" + uri[len("spiffe://"):]
    if validators.url(https) is not True:
        return None
    return (
        f"{uri} is an RFC 3986 URI (scheme, //authority, path-abempty) and a valid SPIFFE ID; "
        f"pkilint accepts {https}: its only objection is the scheme, outside python-validators' fixed list"
    )


LABEL = re.compile(r"^[A-Za-z](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$")


def single_label_reasons(name):
    if not LABEL.match(name) or validators.domain(name + ".example") is not True:
        return None
    return (
        f"`{name}` is one RFC 1034 3.5 <label>, a <subdomain> in the preferred name syntax RFC 5280 4.2.1.6 asks for; "
        f"pkilint accepts `{name}.example`: its only objection is the missing top-level label"
    )


def exemption(finding):
    code, message = finding["code"], finding.get("message") or ""
    value = re.search(r'"(.*)"', message)
    value = value.group(1) if value else ""
    if code == "pkix.invalid_uri_syntax":
        return spiffe_uri_reasons(value)
    if code == "pkix.invalid_domain_name_syntax" and value == "localhost":
        return single_label_reasons(value)
    return None


def run(command):
    # The linters exit non-zero when they report findings; the JSON says what they are.
    out = subprocess.run(command, capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        print(f"pkilint_check: {' '.join(command)} failed (exit {out.returncode}): {out.stderr.strip()}")
        sys.exit(1)


def main(argv):
    if len(argv) >= 2 and argv[0] == "cert":
        command = [str(BIN / "lint_pkix_cert"), "lint", "-s", "ERROR", "-f", "JSON", argv[1]]
    elif len(argv) >= 2 and argv[0] == "crl":
        command = [str(BIN / "lint_crl"), "lint", "-t", "CRL", "-p", "PKIX", "-s", "ERROR", "-f", "JSON", argv[1]]
    elif len(argv) >= 3 and argv[0] == "chain":
        command = [str(BIN / "lint_pkix_signer_signee_cert_chain"), "lint", "-s", "ERROR", "-f", "JSON", argv[1], argv[2]]
    else:
        print(__doc__)
        return 2
    left = 0
    for result in run(command)["results"]:
        for finding in result["finding_descriptions"]:
            where = f"{result['validator']} @ {result['node_path']}"
            why = exemption(finding)
            if why:
                print(f"exempt  {finding['code']} ({finding['severity']}) {where}: {why}")
            else:
                left += 1
                print(f"ERROR   {finding['code']} ({finding['severity']}) {where}: {finding.get('message') or ''}")
    print(f"pkilint: {left} finding(s) of severity ERROR or worse")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
