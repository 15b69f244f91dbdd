#!/usr/bin/env bash
# A four-host test cluster on one machine: network namespaces h1..h4, each with
# an `eth0` (veth) on a bridge that lives in a fifth namespace (h-br), so the
# root namespace gets no address on it, and an sshd of its own.
#
#   scripts/netns-cluster.sh up              # create (idempotent: nothing is touched when healthy)
#   scripts/netns-cluster.sh exec h1 CMD...  # run CMD inside h1 (the repo is visible everywhere)
#   scripts/netns-cluster.sh status          # namespaces, addresses, sshd, an ssh probe
#   scripts/netns-cluster.sh down            # remove everything `up` made
#
# Then, as on a real cluster:
#   scripts/netns-cluster.sh exec h1 target/release/kolorun -H h1:2,h2:2,h3:2,h4:2 target/release/kolo-bench
#
# Addresses: 10.213.0.N/24 and fd00:213::N/64 on hN's eth0 (used only between these
# namespaces; hN-v6 names the IPv6 one). Inside the namespaces /etc/hosts and /etc/ssh are
# bind-mounted by `ip netns exec` from /etc/netns/hN/, so `ssh h2` from h1 works with a job
# key and known_hosts kept in the state directory; the machine's own /etc/ssh and ~/.ssh are
# not touched. Each sshd listens on its namespace's addresses only, key-based, root allowed
# (prohibit-password). Needs root, iproute2 and openssh-server (installed with apt when
# missing). KOLO_NETNS_PREFIX (default h) names the hosts PREFIX1..PREFIX4, so several
# clusters can exist side by side (each is isolated; they reuse the same addresses).
set -euo pipefail

P=${KOLO_NETNS_PREFIX:-h}
[[ $P =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "netns-cluster: KOLO_NETNS_PREFIX=$P: 1-8 of [a-z0-9], starting with a letter" >&2; exit 2; }
HOSTS=("${P}1" "${P}2" "${P}3" "${P}4")
BR="${P}-br"
STATE=/run/kolo-netns/$P
NET4=10.213.0
NET6=fd00:213:
SSHD=/usr/sbin/sshd

die() { echo "netns-cluster: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, sshd)"
    command -v ip >/dev/null || die "ip (iproute2) missing"
}

install_sshd() {
    if [ ! -x $SSHD ] || ! command -v ssh-keygen >/dev/null; then
        echo "netns-cluster: installing openssh-server (apt)" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends openssh-server openssh-client >/dev/null \
            || die "apt-get install openssh-server failed"
    fi
}

sshd_alive() {  # host
    local pid
    pid=$(cat "$STATE/$1/sshd.pid" 2>/dev/null) || return 1
    kill -0 "$pid" 2>/dev/null
}

healthy() {
    local h
    [ -f "$STATE/up" ] || return 1
    for h in "${HOSTS[@]}" "$BR"; do ip netns list | grep -qw "^$h" || return 1; done
    for h in "${HOSTS[@]}"; do sshd_alive "$h" || return 1; done
}

down() {
    local h pid
    for h in "${HOSTS[@]}" "$BR"; do
        if ip netns list | grep -qw "^$h"; then
            # Everything still running in our namespaces was started through them.
            for pid in $(ip netns pids "$h" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$h" 2>/dev/null || true
        fi
        rm -rf "/etc/netns/$h"
    done
    rm -rf "$STATE"
    rmdir /run/kolo-netns 2>/dev/null || true
}

up() {
    need_root
    if healthy; then
        echo "netns-cluster: ${HOSTS[*]} already up" >&2
        return 0
    fi
    install_sshd
    down
    mkdir -p "$STATE" /run/sshd
    chmod 700 "$STATE"
    ip netns add "$BR"
    ip -n "$BR" link set lo up
    ip -n "$BR" link add br0 type bridge
    ip -n "$BR" link set br0 up
    local i h hosts_file known
    hosts_file=$(printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n'
        for i in 1 2 3 4; do printf '%s.%s %s%s\n' "$NET4" "$i" "$P" "$i"; done
        for i in 1 2 3 4; do printf '%s:%s %s%s-v6\n' "$NET6" "$i" "$P" "$i"; done)
    ssh-keygen -q -t ed25519 -N '' -C "kolo-netns-$P" -f "$STATE/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C "kolo-netns-$P-host" -f "$STATE/host_ed25519"
    cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
    known=""
    for i in 1 2 3 4; do
        known+="$P$i,$P$i-v6,$NET4.$i,$NET6:$i $(cut -d' ' -f1,2 "$STATE/host_ed25519.pub")"$'\n'
    done
    printf '%s' "$known" > "$STATE/known_hosts"
    for i in 1 2 3 4; do
        h="$P$i"
        ip netns add "$h"
        ip -n "$h" link set lo up
        ip link add eth0 netns "$h" type veth peer name "$h" netns "$BR"
        ip -n "$BR" link set "$h" master br0
        ip -n "$BR" link set "$h" up
        ip -n "$h" addr add "$NET4.$i/24" dev eth0
        ip -n "$h" addr add "$NET6:$i/64" dev eth0 nodad
        ip -n "$h" link set eth0 up
        mkdir -p "/etc/netns/$h/ssh" "$STATE/$h"
        printf '%s\n' "$hosts_file" > "/etc/netns/$h/hosts"
        # /etc/ssh inside the namespace: the client settings for `ssh hN`.
        [ -f /etc/ssh/moduli ] && cp /etc/ssh/moduli "/etc/netns/$h/ssh/moduli"
        cat > "/etc/netns/$h/ssh/ssh_config" <<EOF
# kolo netns cluster $P (scripts/netns-cluster.sh); removed by 'down'.
Host *
    IdentityFile $STATE/id_ed25519
    UserKnownHostsFile $STATE/known_hosts
    GlobalKnownHostsFile $STATE/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    LogLevel ERROR
EOF
        cat > "$STATE/$h/sshd_config" <<EOF
ListenAddress $NET4.$i
ListenAddress [$NET6:$i]
Port 22
HostKey $STATE/host_ed25519
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64:30:128
PidFile $STATE/$h/sshd.pid
LogLevel ERROR
EOF
        ip netns exec "$h" $SSHD -f "$STATE/$h/sshd_config" -E "$STATE/$h/sshd.log" \
            || die "sshd in $h failed: $(cat "$STATE/$h/sshd.log" 2>/dev/null)"
    done
    # Wait until every sshd answers, from h1.
    local deadline=$((SECONDS + 20))
    for i in 2 3 4 1; do
        until ip netns exec "${P}1" ssh -o ConnectTimeout=2 "$P$i" true 2>/dev/null; do
            [ $SECONDS -lt $deadline ] || die "ssh ${P}1 -> $P$i does not work: $(ip netns exec "${P}1" ssh "$P$i" true 2>&1)"
            sleep 0.2
        done
    done
    touch "$STATE/up"
    echo "netns-cluster: up: ${HOSTS[*]} ($NET4.1-4/24, $NET6:1-4/64), sshd in each; bridge in $BR" >&2
}

status() {
    local h rc=0
    for h in "${HOSTS[@]}"; do
        if ! ip netns list | grep -qw "^$h"; then echo "$h: no namespace"; rc=1; continue; fi
        printf '%s: %s; sshd %s\n' "$h" \
            "$(ip -n "$h" -brief addr show dev eth0 2>/dev/null | awk '{$1=$1};1')" \
            "$(sshd_alive "$h" && echo "running (pid $(cat "$STATE/$h/sshd.pid"))" || echo "NOT running")"
        sshd_alive "$h" || rc=1
    done
    if [ $rc -eq 0 ]; then
        ip netns exec "${P}1" ssh "${P}2" true && echo "ssh ${P}1 -> ${P}2: ok" || { echo "ssh ${P}1 -> ${P}2: FAILED"; rc=1; }
    fi
    return $rc
}

case "${1:-}" in
    up) up ;;
    down) need_root; down; echo "netns-cluster: down: ${HOSTS[*]} $BR removed" >&2 ;;
    status) need_root; status ;;
    exec)
        [ $# -ge 3 ] || die "usage: $0 exec HOST CMD..."
        h=$2; shift 2
        exec ip netns exec "$h" "$@"
        ;;
    *) echo "usage: $0 up|down|status|exec HOST CMD..." >&2; exit 2 ;;
esac
