#!/usr/bin/env python3
"""Checks a `latchkey audit export` slice (JSON lines on stdin) without Latchkey.

Recomputes each record's hash from its fields, in hash format 2 (or format 1, for records
an older store wrote), and checks that each record links to the one before it. Prints one
line per record and exits 1 if any record fails. Claims holding floating-point numbers may
be written differently by Python and serde_json; OIDC claims normally hold none.
"""
import hashlib
import json
import sys

# The entry's fields in schema order (`AuditEntry`); maps inside are sorted by key.
FIELDS = ["time_ms", "request_id", "action", "outcome", "issuer", "identity_key",
          "subject", "repository", "git_ref", "environment", "pipeline",
          "token_fingerprint", "target", "requested_scopes", "granted_scopes", "ttl_secs",
          "rule", "reason", "lease_id", "credential_jti", "credential_fingerprint",
          "context", "claims"]


def canon(v):
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def sha(s):
    return hashlib.sha256(s.encode()).hexdigest()


def main():
    prev, bad = None, 0
    for line in sys.stdin:
        r = json.loads(line)
        entry = "{" + ",".join(f'"{k}":{canon(r[k])}' for k in FIELDS) + "}"
        head = f'"seq":{r["seq"]},"prev_hash":{canon(r["prev_hash"])}'
        v2 = sha(f'{{"v":2,{head},"entry_sha256":"{sha(entry)}"}}')
        v1 = sha(f'{{"v":1,{head},"entry":{entry}}}')
        if r["hash"] not in (v2, v1):
            print(r["seq"], "edited: content does not match its hash")
            bad += 1
        elif prev is not None and r["prev_hash"] != prev:
            print(r["seq"], "does not follow the record before it")
            bad += 1
        else:
            print(r["seq"], "ok")
        prev = r["hash"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
