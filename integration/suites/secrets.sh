# Secrets out of the same user's reach: the daemon's memory is closed to its own uid, it dumps no core, and a key it sent is gone from it
# `mayfly dev` runs as nobody (65534), forked by a shell of nobody's (a process that root
# switched to nobody is left undumpable by the kernel; one a nobody process forks and execs
# is dumpable again — so the daemon starts the way `sleep` starts for the control). Another
# process of nobody cannot open the daemon's /proc/<pid>/mem (EACCES), while it opens that of
# a `sleep` started the same way — the kernel here would otherwise allow it (no Yama), so it
# is the daemon's PR_SET_DUMPABLE 0 that closes it; /proc/<pid>/limits says
# the core size limit is 0, soft and hard. Then a client (nobody) fetches an X509-SVID with
# a server-made key over raw gRPC, and root — the only one that still can — reads the
# daemon's writable memory for the key as sent, its raw scalar (either byte order) and, as
# the control that the scan sees the heap, the certificate the daemon still holds.
# (Sourced by integration/run in a subshell; helpers in integration/lib.sh.)

nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
as_nobody() { "${nobody[@]}" "$@"; }
# A command forked by a shell of nobody's; its pid in the file $PIDFILE names, and a SIGTERM
# to the shell reaches it.
forked_by_nobody=("${nobody[@]}" bash -c 'cd "$1" && shift || exit 1; "$@" & child=$!; echo "$child" > "$PIDFILE"
trap "kill -TERM $child; wait $child; exit" TERM INT; wait "$child"' -)

opens_mem() { # pid: as nobody, open /proc/<pid>/mem for reading; prints the outcome, fails on EACCES/EPERM
  as_nobody "$venv/bin/python" -c '
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

no_copy_left() { # scan-json: the key (DER, raw scalar either way round) nowhere; the CA certificate found
  cat "$1"
  python3 -c '
import json, sys
c = json.load(open(sys.argv[1]))
sys.exit(0 if c["key_der"] == c["scalar"] == c["scalar_reversed"] == 0 and c["ca"] >= 1 else 1)' "$1"
}

command -v setpriv >/dev/null || { echo "integration: setpriv (util-linux) is required"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "integration: the secrets suite needs root (to run the daemon as nobody)"; exit 2; }
need_py_spiffe
# nobody's own place: the suite's work dir is root's (0700).
nb=$(mktemp -d /tmp/mayfly-integration-secrets-nobody.XXXXXX)
scratch+=("$nb")
cp -r "$root/policies" "$nb/policies"
chown -R 65534:65534 "$nb"
export PIDFILE=$nb/daemon.pid
start_daemon dev "$nb/data" "$nb/mayfly.sock" "${forked_by_nobody[@]}" "$nb" "$bin" dev --data-dir "$nb/data" \
  --policies "$nb/policies" --socket "$nb/mayfly.sock" --admin-socket "$nb/admin.sock" --listen none || exit 1
pid=$(cat "$PIDFILE")
check "the daemon runs as nobody"                 bash -c "ps -o uid=,comm= -p $pid | grep -Eq '^ *65534 +mayfly'"
check "nobody cannot open the daemon's /proc/<pid>/mem (EACCES)" refused_with EACCES opens_mem "$pid"
export PIDFILE=$nb/sleep.pid
spawn "${forked_by_nobody[@]}" "$nb" sleep 60
wait_until test -s "$PIDFILE"
check "control: nobody opens the mem of a process of its own started the same way" opens_mem "$(cat "$PIDFILE")"
stop "$spawned"
check "core dumps are off: Max core file size 0, soft and hard" core_limit_is_zero "$pid"

export SPIFFE_ENDPOINT_SOCKET=unix://$nb/mayfly.sock
check "a workload (nobody) fetches an X509-SVID with a server-made key" as_nobody "$venv/bin/python" "$root/integration/memscan.py" fetch "$nb/sent"
unset SPIFFE_ENDPOINT_SOCKET
sleep 1
check "root scans the daemon's memory"            save "$work/scan.json" "$venv/bin/python" "$root/integration/memscan.py" scan "$pid" "$nb/sent.key" "$nb/sent.cert" "$nb/sent.ca"
check "no copy of the sent key is left in it (the CA certificate, its control, is found)" no_copy_left "$work/scan.json"
rm -f "$nb/sent.key"
check "dev stops cleanly"                         stop_daemon
