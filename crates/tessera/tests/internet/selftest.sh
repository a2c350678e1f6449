#!/usr/bin/env bash
# Self-test of netns.sh: builds the emulated internet, checks NAT, isolation,
# UDP hole punching, the UDP-blocking home and shaping, then tears it down.
#
#   selftest.sh [PREFIX]      (default PREFIX: nst)
#
# Needs root, ip, nft, tc and python3. Exit status is non-zero if any check fails.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
NETNS="$HERE/netns.sh"
P=${1:-nst}
PY=$(python3 -c 'import sys; print(sys.executable)') || { echo "selftest: python3 not found" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/netns-selftest.XXXXXX")
FAILS=0
BG=()

cleanup() {
    local pid
    for pid in "${BG[@]}"; do kill "$pid" 2>/dev/null; done
    "$NETNS" down "$P" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT

pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
nsx() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }
bg() { local n=$1; shift; ip netns exec "$P-$n" "$@" & BG+=($!); }

cat >"$WORK/nt.py" <<'PYEOF'
import os, socket, sys, time

def tcp_server(host, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port))); s.listen(64)
    while True:
        c, a = s.accept()
        try:
            c.settimeout(10)
            req = c.recv(64)
            if req.startswith(b"GET "):          # download n bytes
                n = int(req.split()[1]); buf = b"x" * 65536
                while n > 0:
                    k = c.send(buf[:min(n, len(buf))]); n -= k
            elif req.startswith(b"PUT "):        # upload n bytes
                n = int(req.split()[1]); got = 0
                while got < n:
                    d = c.recv(65536)
                    if not d: break
                    got += len(d)
                c.sendall(b"ok %d\n" % got)
            else:
                c.sendall(("peer=%s:%d\n" % a).encode())
        except OSError:
            pass
        finally:
            c.close()

def tcp_client(host, port, timeout="3", tries="1"):
    last = None
    for _ in range(int(tries)):
        try:
            s = socket.create_connection((host, int(port)), timeout=float(timeout))
            s.sendall(b"hello"); print(s.recv(128).decode().strip()); return 0
        except OSError as e:
            last = e; time.sleep(0.2)
    print("error: %s" % last); return 1

def connect_times(host, port, n):
    worst = 0.0; total = 0.0; fails = 0
    for _ in range(int(n)):
        t = time.monotonic()
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"hello"); s.recv(128); s.close()
        except OSError:
            fails += 1
        d = time.monotonic() - t; total += d; worst = max(worst, d)
    print("n=%s mean_ms=%.1f worst_ms=%.1f failures=%d" % (n, 1000 * total / int(n), 1000 * worst, fails))
    return 0 if fails == 0 else 1

def bulk(direction, host, port, mbytes):
    n = int(float(mbytes) * 1e6)
    s = socket.create_connection((host, int(port)), timeout=20)
    t = time.monotonic()
    if direction == "down":
        s.sendall(b"GET %d" % n); got = 0
        while got < n:
            d = s.recv(1 << 20)
            if not d: break
            got += len(d)
    else:
        s.sendall(b"PUT %d" % n); time.sleep(0.05); buf = b"y" * 65536; left = n
        while left > 0:
            k = s.send(buf[:min(left, len(buf))]); left -= k
        got = int(s.recv(64).split()[1])
    dt = time.monotonic() - t
    print("%.1f" % (got * 8 / dt / 1e6)); return 0 if got == n else 1

def stun_server(host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, int(port)))
    while True:
        d, a = s.recvfrom(2048)
        s.sendto(("%s %d" % a).encode(), a)

def punch(name, port, stun_host, stun_port, workdir, peer, duration):
    """Learn own public mapping via the STUN-like echo, publish it in workdir,
    read the peer's, then both sides spray packets at each other's mapping."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(port)))
    s.settimeout(0.3)
    mine = None
    for _ in range(10):
        s.sendto(b"stun?", (stun_host, int(stun_port)))
        try:
            d, a = s.recvfrom(2048)
            if a == (stun_host, int(stun_port)):
                ip, p = d.decode().split(); mine = (ip, int(p)); break
        except socket.timeout:
            pass
    print("%s: local %s mapped %s" % (name, s.getsockname(), mine if mine else "none (STUN unreachable)"))
    tmp = os.path.join(workdir, name + ".map.tmp")
    with open(tmp, "w") as f:
        f.write("%s %d" % mine if mine else "none")
    os.rename(tmp, os.path.join(workdir, name + ".map"))
    theirs = None; deadline = time.monotonic() + 10
    pf = os.path.join(workdir, peer + ".map")
    while time.monotonic() < deadline:
        if os.path.exists(pf):
            t = open(pf).read().split()
            theirs = (t[0], int(t[1])) if len(t) == 2 else None
            break
        time.sleep(0.05)
    print("%s: peer %s mapping %s" % (name, peer, theirs))
    got_from = None; got_ack = False; sent = 0
    end = time.monotonic() + float(duration); s.settimeout(0.05)
    while time.monotonic() < end:
        if theirs:
            s.sendto(("punch from %s%s" % (name, " ack" if got_from else "")).encode(), theirs); sent += 1
        try:
            d, a = s.recvfrom(2048)
            if d.startswith(b"punch from " + peer.encode()):
                if got_from is None:
                    got_from = a
                    print("%s: received %r from %s:%d" % (name, d.decode(), a[0], a[1]))
                if d.endswith(b" ack"):
                    got_ack = True
        except socket.timeout:
            pass
        if got_from and got_ack:
            # keep sending briefly so the peer also sees our ack
            end = min(end, time.monotonic() + 0.5)
    print("%s: sent=%d received_from_peer=%s peer_saw_us=%s" % (name, sent, bool(got_from), got_ack))
    return 0 if got_from else 1

if __name__ == "__main__":
    f = {"tcp-server": tcp_server, "tcp-client": tcp_client, "connect-times": connect_times,
         "bulk": bulk, "stun-server": stun_server, "punch": punch}[sys.argv[1]]
    sys.exit(f(*sys.argv[2:]) or 0)
PYEOF
NT=("$PY" -u "$WORK/nt.py")

echo "== netns.sh up $P"
if ! "$NETNS" up "$P"; then
    echo "FAIL: netns.sh up $P"
    exit 1
fi

HUB=203.0.113.10
RELAY=203.0.113.11
bg hub "${NT[@]}" tcp-server $HUB 8000
bg relay "${NT[@]}" tcp-server $RELAY 8443
bg relay "${NT[@]}" stun-server $RELAY 3478
bg h1 "${NT[@]}" tcp-server 192.168.1.2 8000
# wait for the servers (loss may eat a SYN; retries cover that)
nsx hub "${NT[@]}" tcp-client $HUB 8000 1 30 >/dev/null
nsx relay "${NT[@]}" tcp-client $RELAY 8443 1 30 >/dev/null
nsx h1 "${NT[@]}" tcp-client 192.168.1.2 8000 1 30 >/dev/null

echo "== 1. TCP home -> hub, source NATed to the router's public address"
for k in 1 2 3; do
    out=$(nsx "h$k" "${NT[@]}" tcp-client $HUB 8000 3 3)
    if [[ $out == "peer=203.0.113.2$k:"* ]]; then
        pass "h$k -> hub TCP, hub saw ${out#peer=}"
    else
        fail "h$k -> hub TCP: expected peer=203.0.113.2$k:*, got '$out'"
    fi
done

echo "== 2. public host cannot reach a home host"
out=$(nsx hub "${NT[@]}" tcp-client 192.168.1.2 8000 2 1)
if [ $? -ne 0 ]; then pass "hub -> 192.168.1.2:8000 unreachable ($out)"; else fail "hub reached 192.168.1.2: $out"; fi
nsx hub ip route add 192.168.1.0/24 via 203.0.113.21
out=$(nsx hub "${NT[@]}" tcp-client 192.168.1.2 8000 2 1)
if [ $? -ne 0 ]; then pass "hub -> 192.168.1.2:8000 unreachable even with a route via r1 ($out)"; else fail "hub reached 192.168.1.2 via r1: $out"; fi
nsx hub ip route del 192.168.1.0/24 via 203.0.113.21

echo "== 3. UDP hole punching h1 <-> h2"
mkdir -p "$WORK/p12"
nsx h1 "${NT[@]}" punch h1 40001 $RELAY 3478 "$WORK/p12" h2 5 >"$WORK/p12/h1.log" 2>&1 &
p1=$!
nsx h2 "${NT[@]}" punch h2 40002 $RELAY 3478 "$WORK/p12" h1 5 >"$WORK/p12/h2.log" 2>&1 &
p2=$!
wait $p1; r1=$?; wait $p2; r2=$?
sed 's/^/    /' "$WORK/p12/h1.log" "$WORK/p12/h2.log"
if [ $r1 -eq 0 ] && [ $r2 -eq 0 ]; then pass "h1 and h2 each received the other's UDP packet"; else fail "hole punching h1<->h2 (h1 rc=$r1, h2 rc=$r2)"; fi
m1=$(cat "$WORK/p12/h1.map" 2>/dev/null); m2=$(cat "$WORK/p12/h2.map" 2>/dev/null)
if [ "$m1" = "203.0.113.21 40001" ] && [ "$m2" = "203.0.113.22 40002" ]; then
    pass "masquerade preserved source ports (h1 -> $m1, h2 -> $m2)"
else
    echo "INFO: mappings not port-preserving: h1 -> '$m1', h2 -> '$m2'"
fi

echo "== 4. home 3 blocks UDP, TCP still works"
mkdir -p "$WORK/p31"
nsx h3 "${NT[@]}" punch h3 40003 $RELAY 3478 "$WORK/p31" h1 3 >"$WORK/p31/h3.log" 2>&1 &
p3=$!
nsx h1 "${NT[@]}" punch h1 40011 $RELAY 3478 "$WORK/p31" h3 3 >"$WORK/p31/h1.log" 2>&1 &
p1=$!
wait $p3; r3=$?; wait $p1; r1=$?
sed 's/^/    /' "$WORK/p31/h3.log" "$WORK/p31/h1.log"
if [ $r3 -ne 0 ] && [ $r1 -ne 0 ]; then pass "no UDP between h3 and h1 (h3 could not even reach the STUN echo)"; else fail "UDP got through home 3 (h3 rc=$r3, h1 rc=$r1)"; fi
out=$(nsx h3 "${NT[@]}" tcp-client $RELAY 8443 3 3)
if [[ $out == "peer=203.0.113.23:"* ]]; then pass "h3 -> relay TCP, relay saw ${out#peer=}"; else fail "h3 -> relay TCP: '$out'"; fi

echo "== 5. shaping and loss"
out=$(nsx h1 "${NT[@]}" connect-times $HUB 8000 200)
if [ $? -eq 0 ]; then pass "200 TCP connects h1 -> hub under loss: $out"; else fail "TCP connects under loss: $out"; fi
down=$(nsx h1 "${NT[@]}" bulk down $HUB 8000 25) || down=0
up=$(nsx h1 "${NT[@]}" bulk up $HUB 8000 12) || up=0
dcap=${DOWN_MBIT:-100}; ucap=${UP_MBIT:-50}
if awk -v r="$down" -v c="$dcap" 'BEGIN{exit !(r > 0.3*c && r < 1.15*c)}'; then
    pass "h1 download ${down} Mbit/s (cap ${dcap})"
else
    fail "h1 download ${down} Mbit/s, expected near cap ${dcap}"
fi
if awk -v r="$up" -v c="$ucap" 'BEGIN{exit !(r > 0.3*c && r < 1.15*c)}'; then
    pass "h1 upload ${up} Mbit/s (cap ${ucap})"
else
    fail "h1 upload ${up} Mbit/s, expected near cap ${ucap}"
fi
for k in 1 2 3; do
    echo "INFO: r$k drop counters: $(nsx "r$k" nft list chain inet home forward \
        | awk '/counter/ {for (i=1;i<=NF;i++) if ($i=="packets") p=$(i+1); for (i=1;i<=NF;i++) if ($i=="comment") c=$(i+1); printf "%s=%s ", c, p}')"
done

echo "== 6. netns.sh down $P"
for pid in "${BG[@]}"; do kill "$pid" 2>/dev/null; done
wait 2>/dev/null
BG=()
"$NETNS" down "$P"
left=$(ip netns list | awk '{print $1}' | grep -E "^$P-" || true)
if [ -z "$left" ]; then pass "no namespace left with prefix $P-"; else fail "namespaces left: $left"; fi
"$NETNS" down "$P" && pass "second down on a clean prefix succeeds" || fail "second down failed"

echo
if [ "$FAILS" -eq 0 ]; then echo "selftest: ALL PASS"; else echo "selftest: $FAILS FAILED"; fi
[ "$FAILS" -eq 0 ]
