# Secrets out of the same user's reach: the daemon's memory is closed to its own uid, it dumps no core, and a key it sent is gone from it
# `mayfly dev` runs as nobody (65534). Another process of nobody cannot open the daemon's
# /proc/<pid>/mem (EACCES), while it can open that of a dumpable process of its own — the
# control that the kernel here would otherwise allow it (no Yama); /proc/<pid>/limits says
# the core size limit is 0, soft and hard. Then a client (nobody) fetches an X509-SVID with
# a server-made key over raw gRPC, and root — the only one that still can — reads the
# daemon's writable memory for the key as sent, its raw scalar (either byte order) and, as
# the control that the scan sees the heap, the certificate the daemon still holds.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }

opens_mem() { # pid: as nobody, open /proc/<pid>/mem for reading; prints the outcome, fails on EACCES/EPERM
  as_nobody python3 -c '
import errno, sys
try:
    open(f"/proc/{sys.argv[1]}/mem", "rb").close()
    print("opened")
except OSError as e:
    print(errno.errorcode.get(e.errno, e.errno), e.strerror)
    sys.exit(1 if e.errno in (errno.EACCES, errno.EPERM) else 2)' "$1"
}

core_limit_is_zero() { # pid
  grep '^Max core file size' "/proc/$1/limits"
  grep -Eq '^Max core file size +0 +0 ' "/proc/$1/limits"
}

no_copy_left() { # scan-json: the key (DER, raw scalar either way round) nowhere; the certificate found
  cat "$1"
  python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
sys.exit(0 if c["key_der"] == c["scalar"] == c["scalar_reversed"] == 0 and c["certificate"] >= 1 else 1)' "$1"
}

command -v setpriv >/dev/null || { echo "integration: setpriv (util-linux) is required"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "integration: the secrets suite needs root (to run the daemon as nobody)"; exit 2; }
need_py_spiffe
# nobody's own place: the suite's work dir is root's (0700).
nb=$(mktemp -d /tmp/mayfly-integration-secrets-nobody.XXXXXX)
scratch+=("$nb")
cp -r "$root/policies" "$nb/policies"
chown -R 65534:65534 "$nb"
start_daemon dev "$nb/data" "$nb/mayfly.sock" as_nobody "$bin" dev --data-dir "$nb/data" --policies "$nb/policies" \
  --socket "$nb/mayfly.sock" --admin-socket "$nb/admin.sock" --listen none || exit 1
# start_daemon's pid is the bash that execs setpriv, which execs mayfly: the same process.
pid=$daemon_pid
check "the daemon runs as nobody"                 bash -c "ps -o uid= -p $pid | grep -qx ' *65534'"
check "nobody cannot open the daemon's /proc/<pid>/mem (EACCES)" refused_with EACCES opens_mem "$pid"
spawn as_nobody sleep 60
check "control: nobody opens a dumpable nobody process's mem" opens_mem "$spawned"
stop "$spawned"
check "core dumps are off: Max core file size 0, soft and hard" core_limit_is_zero "$pid"

export SPIFFE_ENDPOINT_SOCKET=unix://$nb/mayfly.sock
check "a workload (nobody) fetches an X509-SVID with a server-made key" as_nobody "$venv/bin/python" "$root/integration/memscan.py" fetch "$nb/sent"
unset SPIFFE_ENDPOINT_SOCKET
sleep 1
check "root scans the daemon's memory"            save "$work/scan.json" "$venv/bin/python" "$root/integration/memscan.py" scan "$pid" "$nb/sent.key" "$nb/sent.cert"
check "no copy of the sent key is left in it (the certificate is found)" no_copy_left "$work/scan.json"
rm -f "$nb/sent.key"
check "dev stops cleanly"                         stop_daemon
