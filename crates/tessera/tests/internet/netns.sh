#!/usr/bin/env bash
# Emulated internet out of Linux network namespaces (see README.md).
#
#   netns.sh up PREFIX      tear down PREFIX, then build the topology
#   netns.sh down PREFIX    remove every namespace named PREFIX-* (never fails)
#   netns.sh check          report available tools/kernel features
#
# Environment overrides (read by `up`):
#   UP_MBIT=50          per-home upload cap   (tbf on the router's wan0 egress)
#   DOWN_MBIT=100       per-home download cap (tbf on the router's lan0 egress)
#   LOSS_PERMILLE=5     random loss per forwarded packet at each home router
#   LOSS_PROTO=all      which forwarded packets the loss rule hits: all | udp
#   DELAY_MS=20         one-way delay per router egress (needs netem)
#   JITTER_MS=5         jitter on that delay (needs netem)
#   HOMES=3             number of homes (1..9)
#   UDP_BLOCKED_HOMES=3 homes whose router drops all forwarded UDP (space list)
set -Eeuo pipefail

SELF=${0##*/}
PUBNET=203.0.113
HUB_IP=$PUBNET.10
RELAY_IP=$PUBNET.11

die() { echo "netns: error: $*" >&2; exit 1; }
log() { echo "netns: $*"; }

# ---------------------------------------------------------------- helpers

have() { command -v "$1" >/dev/null 2>&1; }

require_tools() {
    have ip || die "required tool 'ip' not found in PATH (install iproute2)"
    have tc || die "required tool 'tc' not found in PATH (install iproute2)"
    have nft || die "required tool 'nft' not found in PATH (install nftables)"
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)"
}

check_prefix() {
    [ -n "${1:-}" ] || die "missing PREFIX (usage: $SELF up|down PREFIX)"
    [[ $1 =~ ^[A-Za-z0-9_]{1,16}$ ]] || die "PREFIX '$1' must match [A-Za-z0-9_]{1,16}"
}

# Run a command inside namespace $P-$1.
nsx() { local n=$1; shift; ip netns exec "$P-$n" "$@"; }

# Names of existing namespaces that start with "$1-".
list_ns() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$1-" || true
}

# Probe whether a qdisc kind can be created (on lo of a namespace).
qdisc_works() { # ns kind args...
    local ns=$1 kind=$2; shift 2
    if ip netns exec "$ns" tc qdisc add dev lo root "$kind" "$@" >/dev/null 2>&1; then
        ip netns exec "$ns" tc qdisc del dev lo root >/dev/null 2>&1 || true
        return 0
    fi
    return 1
}

# tbf burst: at least 10ms worth of data, and at least one GSO super-packet.
tbf_args() { # mbit
    local mbit=$1 burst
    burst=$(( mbit * 1000000 / 8 / 100 ))
    [ "$burst" -ge 65536 ] || burst=65536
    echo "rate ${mbit}mbit burst ${burst} latency 100ms"
}

# ------------------------------------------------------------------ down

do_down() {
    local pfx=$1 ns pids i
    # Stop stray processes first: a namespace whose name is removed stays
    # alive (and keeps its addresses bound) while any process lives in it.
    for ns in $(list_ns "$pfx"); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] || kill $pids 2>/dev/null || true
    done
    for i in 1 2 3 4 5 6 7 8 9 10; do
        pids=""
        for ns in $(list_ns "$pfx"); do
            pids+=" $(ip netns pids "$ns" 2>/dev/null || true)"
        done
        [ -n "${pids// /}" ] || break
        if [ "$i" -eq 10 ]; then kill -9 $pids 2>/dev/null || true; else sleep 0.2; fi
    done
    for ns in $(list_ns "$pfx"); do
        ip netns del "$ns" 2>/dev/null || true
    done
    if [ -n "$(list_ns "$pfx")" ]; then
        echo "netns: warning: could not remove: $(list_ns "$pfx" | tr '\n' ' ')" >&2
    fi
    return 0
}

# ----------------------------------------------------------------- check

do_check() {
    local ok=0 probe="nschk$$" k
    for k in ip nft tc python3; do
        if have "$k"; then echo "$k: yes ($(command -v "$k"))"; else echo "$k: no"; fi
    done
    have ip && have nft && have tc || ok=1
    [ "$(id -u)" -eq 0 ] && echo "root: yes" || { echo "root: no"; ok=1; }
    if have ip && ip netns add "$probe" >/dev/null 2>&1; then
        echo "netns: yes"
        ip -n "$probe" link set lo up 2>/dev/null || true
        if have nft && printf '%s\n' 'table ip t {' \
                'chain f { type filter hook forward priority 0; policy accept; }' \
                'chain p { type nat hook postrouting priority 100; policy accept; }' \
                '}' | ip netns exec "$probe" nft -f - >/dev/null 2>&1; then
            echo "nft-in-netns: yes"
            if printf '%s\n' 'add rule ip t p oifname "lo" masquerade' \
                    'add rule ip t f numgen random mod 1000 < 5 drop' \
                    | ip netns exec "$probe" nft -f - >/dev/null 2>&1; then
                echo "nft-masquerade+numgen: yes"
            else
                echo "nft-masquerade+numgen: no"; ok=1
            fi
        else
            echo "nft-in-netns: no"; ok=1
        fi
        if have tc; then
            for k in tbf htb netem; do
                case $k in
                    tbf) qdisc_works "$probe" tbf rate 1mbit burst 32kb latency 50ms ;;
                    htb) qdisc_works "$probe" htb default 1 ;;
                    netem) qdisc_works "$probe" netem delay 1ms ;;
                esac && echo "$k: yes" || echo "$k: no"
            done
            qdisc_works "$probe" tbf rate 1mbit burst 32kb latency 50ms || ok=1
        fi
        ip netns del "$probe" 2>/dev/null || true
    else
        echo "netns: no"; ok=1
    fi
    return $ok
}

# -------------------------------------------------------------------- up

# veth pair: end $2 in ns $1, end $4 in ns $3 (nothing touches the root ns).
veth() {
    ip -n "$P-$1" link add "$2" type veth peer name "$4" netns "$P-$3" \
        || die "cannot create veth $1:$2 <-> $3:$4 (kernel lacks veth?)"
}

# Attach a public host's veth end to the bridge in $P-inet.
bridge_port() {
    ip -n "$P-inet" link set "$1" master br0
    ip -n "$P-inet" link set "$1" up
}

router_nft() { # k block_udp
    local k=$1 block_udp=$2 loss_match=""
    [ "$LOSS_PROTO" = udp ] && loss_match="meta l4proto udp "
    {
        echo "table ip nat {"
        echo "  chain postrouting {"
        echo "    type nat hook postrouting priority 100; policy accept;"
        echo "    oifname \"wan0\" masquerade"
        echo "  }"
        echo "}"
        echo "table inet home {"
        echo "  chain forward {"
        echo "    type filter hook forward priority 0; policy drop;"
        if [ "$LOSS_PERMILLE" -gt 0 ]; then
            echo "    ${loss_match}numgen random mod 1000 < $LOSS_PERMILLE counter drop comment \"loss\""
        fi
        if [ "$block_udp" = 1 ]; then
            echo "    meta l4proto udp counter drop comment \"udp-blocked\""
        fi
        echo "    ct state established,related accept"
        echo "    iifname \"lan0\" oifname \"wan0\" accept"
        echo "    counter drop comment \"unsolicited\""
        echo "  }"
        # Home-router firewall: unsolicited packets to the router itself are
        # dropped before conntrack confirms them. Otherwise an early hole-punch
        # packet from the peer creates a conntrack entry for router:port that
        # makes masquerade pick a different source port for the outbound flow.
        echo "  chain input {"
        echo "    type filter hook input priority 0; policy drop;"
        echo "    iif \"lo\" accept"
        echo "    ct state established,related accept"
        echo "    iifname \"lan0\" accept"
        echo "  }"
        echo "}"
    } | nsx "r$k" nft -f - \
        || die "nftables ruleset for $P-r$k rejected (kernel lacks nf_tables/nft_masq/nft_numgen/nf_nat?)"
}

shape() { # ns dev mbit
    local ns=$1 dev=$2 mbit=$3
    if [ "$NETEM" = 1 ]; then
        nsx "$ns" tc qdisc add dev "$dev" root handle 1: netem \
            delay "${DELAY_MS}ms" "${JITTER_MS}ms" \
            || die "netem qdisc on $P-$ns:$dev failed"
        nsx "$ns" tc qdisc add dev "$dev" parent 1:1 handle 10: tbf $(tbf_args "$mbit") \
            || die "tbf qdisc (under netem) on $P-$ns:$dev failed"
    else
        nsx "$ns" tc qdisc add dev "$dev" root handle 1: tbf $(tbf_args "$mbit") \
            || die "tbf qdisc on $P-$ns:$dev failed (kernel lacks sch_tbf?)"
    fi
}

on_up_error() {
    local rc=$1 line=$2 cmd=$3
    trap - ERR
    echo "netns: error: 'up $P' failed at line $line: $cmd (exit $rc)" >&2
    exit 1
}

on_up_exit() {
    local rc=$?
    trap - EXIT
    if [ "$rc" -ne 0 ]; then
        echo "netns: 'up $P' did not complete; tearing down $P-*" >&2
        do_down "$P"
    fi
    exit "$rc"
}

udp_blocked() { # k
    local b
    for b in ${UDP_BLOCKED_HOMES//,/ }; do [ "$b" = "$1" ] && return 0; done
    return 1
}

do_up() {
    local k n lan

    UP_MBIT=${UP_MBIT:-50}
    DOWN_MBIT=${DOWN_MBIT:-100}
    LOSS_PERMILLE=${LOSS_PERMILLE:-5}
    LOSS_PROTO=${LOSS_PROTO:-all}
    DELAY_MS=${DELAY_MS:-20}
    JITTER_MS=${JITTER_MS:-5}
    HOMES=${HOMES:-3}
    UDP_BLOCKED_HOMES=${UDP_BLOCKED_HOMES-3}
    for n in UP_MBIT DOWN_MBIT LOSS_PERMILLE DELAY_MS JITTER_MS HOMES; do
        [[ ${!n} =~ ^[0-9]+$ ]] || die "$n='${!n}' must be a non-negative integer"
    done
    [ "$UP_MBIT" -gt 0 ] && [ "$DOWN_MBIT" -gt 0 ] || die "UP_MBIT/DOWN_MBIT must be > 0"
    [ "$LOSS_PERMILLE" -le 1000 ] || die "LOSS_PERMILLE must be <= 1000"
    [ "$HOMES" -ge 1 ] && [ "$HOMES" -le 9 ] || die "HOMES must be 1..9"
    case $LOSS_PROTO in all|udp) ;; *) die "LOSS_PROTO must be 'all' or 'udp'";; esac

    do_down "$P"
    trap 'on_up_error $? $LINENO "$BASH_COMMAND"' ERR
    trap on_up_exit EXIT

    # Namespaces, loopback.
    for n in inet hub relay $(for k in $(seq "$HOMES"); do echo "r$k h$k"; done); do
        ip netns add "$P-$n" || die "cannot create network namespace $P-$n"
        ip -n "$P-$n" link set lo up
    done

    # Feature probe (inside our own namespace, so nothing global is touched).
    if qdisc_works "$P-inet" netem delay 1ms; then
        NETEM=1
    else
        NETEM=0
        log "netem unavailable in this kernel: latency and jitter not emulated"
    fi
    qdisc_works "$P-inet" tbf rate 1mbit burst 32kb latency 50ms \
        || die "tbf qdisc unavailable (kernel lacks sch_tbf): bandwidth cannot be emulated"

    # The public internet: one bridge.
    ip -n "$P-inet" link add br0 type bridge || die "cannot create bridge (kernel lacks bridge module?)"
    ip -n "$P-inet" link set br0 up

    veth hub eth0 inet hub
    veth relay eth0 inet relay
    bridge_port hub
    bridge_port relay
    ip -n "$P-hub" addr add "$HUB_IP/24" dev eth0
    ip -n "$P-relay" addr add "$RELAY_IP/24" dev eth0
    ip -n "$P-hub" link set eth0 up
    ip -n "$P-relay" link set eth0 up

    # Homes.
    for k in $(seq "$HOMES"); do
        lan=192.168.$k
        veth "r$k" wan0 inet "r$k"
        bridge_port "r$k"
        veth "r$k" lan0 "h$k" eth0
        ip -n "$P-r$k" addr add "$PUBNET.2$k/24" dev wan0
        ip -n "$P-r$k" addr add "$lan.1/24" dev lan0
        ip -n "$P-r$k" link set wan0 up
        ip -n "$P-r$k" link set lan0 up
        ip -n "$P-h$k" addr add "$lan.2/24" dev eth0
        ip -n "$P-h$k" link set eth0 up
        ip -n "$P-h$k" route add default via "$lan.1"
        nsx "r$k" sysctl -qw net.ipv4.ip_forward=1 \
            || die "cannot enable ip_forward in $P-r$k"
        router_nft "$k" "$(udp_blocked "$k" && echo 1 || echo 0)"
        shape "r$k" wan0 "$UP_MBIT"
        shape "r$k" lan0 "$DOWN_MBIT"
    done

    trap - ERR EXIT
    summary
}

summary() {
    local k emu nat
    if [ "$NETEM" = 1 ]; then
        emu="up ${UP_MBIT}mbit down ${DOWN_MBIT}mbit, delay ${DELAY_MS}ms±${JITTER_MS}ms each way"
    else
        emu="up ${UP_MBIT}mbit down ${DOWN_MBIT}mbit, no delay"
    fi
    if [ "$LOSS_PERMILLE" -gt 0 ]; then
        emu+=", loss ${LOSS_PERMILLE}/1000 ($LOSS_PROTO, each direction)"
    fi
    echo "netns: topology '$P' is up"
    printf '  %-12s %-22s %s\n' "$P-inet" "br0 (no address)" "public internet $PUBNET.0/24"
    printf '  %-12s %-22s %s\n' "$P-hub" "eth0 $HUB_IP/24" "public, unshaped"
    printf '  %-12s %-22s %s\n' "$P-relay" "eth0 $RELAY_IP/24" "public, unshaped"
    for k in $(seq "$HOMES"); do
        if udp_blocked "$k"; then
            nat="NAT masquerade, ALL forwarded UDP dropped (TCP only)"
        else
            nat="NAT masquerade (port-preserving, UDP hole punching works)"
        fi
        printf '  %-12s %-22s %s\n' "$P-r$k" "wan0 $PUBNET.2$k/24" "$nat"
        printf '  %-12s %-22s %s\n' "" "lan0 192.168.$k.1/24" "$emu"
        printf '  %-12s %-22s %s\n' "$P-h$k" "eth0 192.168.$k.2/24" "home host, default via 192.168.$k.1"
    done
}

# ------------------------------------------------------------------ main

cmd=${1:-}
case $cmd in
    up)
        require_tools
        check_prefix "${2:-}"
        P=$2
        do_up
        ;;
    down)
        check_prefix "${2:-}"
        have ip || exit 0
        do_down "$2"
        ;;
    check)
        do_check
        ;;
    *)
        echo "usage: $SELF up PREFIX | down PREFIX | check" >&2
        exit 2
        ;;
esac
