# Shared by the bench/ scripts that run `mayfly serve`: a signed release of the shipped
# policies, a config with the per-caller rate lifted, and a start that times the daemon
# from exec to a connectable socket. Needs $bin, $root, $py; `start`/`stop_daemon` use $dir
# and set $pid and $ms.

mayfly_config() { # dir: writes dir/mayfly.toml (data in dir/data) and its signed policy release
  local dir=$1
  openssl genpkey -algorithm ed25519 -out "$dir/release.key" 2>/dev/null
  openssl pkey -in "$dir/release.key" -pubout -out "$dir/release.pub"
  "$bin" policy build "$root/policies" --out "$dir/policy.bundle" --label bench >/dev/null
  "$bin" policy sign "$dir/policy.bundle" --key "$dir/release.key" >/dev/null
  cat >"$dir/mayfly.toml" <<TOML
trust_domain = "mayfly.local"
data_dir = "$dir/data"
[policy]
bundle = "$dir/policy.bundle"
trusted_keys = ["$dir/release.pub"]
poll_interval = "1h"
[workload_api]
socket = "$dir/w.sock"
[admin]
socket = "$dir/admin.sock"
[ca]
generate = true
[limits]
# One benchmark client is one uid and one identity: lift the per-caller rate so the run
# measures the daemon, not its fairness limits (max_in_flight stays at its default).
rate_per_caller = 1000000
burst_per_caller = 1000000
in_flight_per_caller = 1024
TOML
  mkdir -p "$dir/data"
  chmod 700 "$dir/data"
}

start() { # starts the daemon of $dir ($pid); $ms: from its exec until its socket serves HTTP/2
  rm -f "$dir/w.sock"
  local out
  out=$("$py" - "$dir/w.sock" "$dir/daemon.log" "$bin" serve --config "$dir/mayfly.toml" <<'PY'
import socket, subprocess, sys, time
sock, log, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
t = time.monotonic()
p = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT)
# Ready means served, not only listening: the kernel accepts a connection as soon as the
# socket listens, so wait for the server's HTTP/2 SETTINGS in answer to a client preface.
hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
while time.monotonic() - t < 120 and p.poll() is None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        s.sendall(hello)
        s.settimeout(0.5)
        if s.recv(9):
            break
    except OSError:
        time.sleep(0.0002)
    finally:
        s.close()
else:
    sys.exit("the daemon did not answer within 120 s")
print(p.pid, f"{(time.monotonic() - t) * 1000:.1f}")
PY
  ) || { cat "$dir/daemon.log"; exit 1; }
  pid=${out% *}
  ms=${out#* }
}

# The daemon is python's child, not this shell's: stop it by pid and wait until it is gone.
stop_daemon() {
  [ -n "${pid:-}" ] || return 0
  kill "$pid" 2>/dev/null || true
  local state
  for _ in $(seq 1 600); do # gone, or a zombie nobody reaps yet
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || break
    if [ -z "$state" ] || [ "$state" = Z ]; then break; fi
    sleep 0.05
  done
  pid=
}
