#!/bin/sh
# bootd join script for cp1 (pool control)
# Generated for 02:00:00:00:00:11; it carries this node's join token: do not share it.
set -eu

BOOTD_URL=http://10.0.0.1:8080
BOOTD_PEERS=""
NODE_NAME=cp1
# the image version this node booted (its kernel command line says): every report names it
BOOTD_IMAGE=$(tr ' ' '\n' < /proc/cmdline 2>/dev/null | sed -n 's/^bootd\.image=//p' \
    | tr -cd 'a-z0-9._@-') || BOOTD_IMAGE=""

report() {
    # report STAGE MESSAGE: tell bootd how far this node got (best effort)
    body=$(printf '{"stage":"%s","message":"%s","image":"%s"}' "$1" \
        "$(printf '%s' "$2" | tr -d '"\\\n')" "$BOOTD_IMAGE")
    # shellcheck disable=SC2086 # BOOTD_PEERS is a list of URLs, split on purpose
    for server in "$BOOTD_URL" $BOOTD_PEERS; do
        if command -v curl >/dev/null 2>&1; then
            curl -fsS -m 5 -H 'Content-Type: application/json' -d "$body" \
                "$server/api/v1/events" >/dev/null 2>&1 && return 0
        elif command -v wget >/dev/null 2>&1; then
            timeout 10 wget -q -O /dev/null --header='Content-Type: application/json' \
                --post-data="$body" "$server/api/v1/events" && return 0
        fi
    done
    return 0
}

fail() {
    report failed "$1"
    echo "bootd: $1" >&2
    exit 1
}
trap 'fail "join script stopped at line $LINENO"' HUP INT TERM

report join-script "started"

echo "$NODE_NAME" > /etc/hostname
hostname "$NODE_NAME" 2>/dev/null || true
modprobe br_netfilter || fail 'modprobe br_netfilter failed'
modprobe overlay || fail 'modprobe overlay failed'

mkdir -p /etc/default
cat > /etc/default/kubelet <<'BOOTD_KUBELET'
KUBELET_EXTRA_ARGS=''
BOOTD_KUBELET

command -v kubeadm >/dev/null 2>&1 \
    || fail "kubeadm is not installed in this image (images/build-production-image.sh --kubernetes-repo)"
report kubeadm "joining https://10.0.0.10:6443"
kubeadm join 10.0.0.10:6443 \
    --token abcdef.0123456789abcdef \
    --discovery-token-ca-cert-hash sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0 \
    --node-name "$NODE_NAME" \
    || fail "kubeadm join failed"
report joined "joined 10.0.0.10:6443"
