#!/usr/bin/env bash
# Build bootd's production node image: a Debian root made with mmdebstrap (kernel, systemd,
# openssh, containerd; kubeadm/kubelet/kubectl when their repository is given), squashed,
# plus the kernel and an initramfs-tools initramfs whose `boot=bootd` script fetches the
# squashfs into RAM and boots it under an overlay. See images/README.md.
#
# Output (its path is printed on stdout): vmlinuz, initrd.img, rootfs.squashfs,
# packages.txt (what is inside) and bootd-image.yaml (the `images:` entry for bootd).
# Without --out the result is cached under ~/.cache/bootd/production-image/<hash of the
# recipe and arguments> and rebuilt only when one of them changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

usage() {
  cat <<'EOF'
usage: build-production-image.sh [options]
  --suite SUITE            Debian suite (default: bookworm)
  --mirror URL             Debian mirror (default: http://deb.debian.org/debian)
  --security-mirror URL    Debian security mirror (default: http://deb.debian.org/debian-security)
  --kernel PACKAGE         kernel package (default: linux-image-amd64; linux-image-cloud-amd64
                           is smaller and enough for VMs)
  --include PKG[,PKG...]   extra Debian packages, e.g. NIC firmware (firmware-bnx2x)
  --kubernetes-repo URL    install kubelet, kubeadm and kubectl from this APT repository, e.g.
                           https://pkgs.k8s.io/core:/stable:/v1.31/deb/ (a flat repository)
  --kubernetes-key FILE    its signing key (ASCII-armoured or binary; required with the repo)
  --out DIR                write the image here (no cache)
  -h, --help
EOF
}

suite=bookworm
mirror=http://deb.debian.org/debian
security=http://deb.debian.org/debian-security
kernel=linux-image-amd64
include=""
k8s_repo=""
k8s_key=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) suite=$2; shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --security-mirror) security=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --include) include=$2; shift 2 ;;
    --kubernetes-repo) k8s_repo=$2; shift 2 ;;
    --kubernetes-key) k8s_key=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-production-image: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -n "$k8s_repo" ] && [ ! -r "$k8s_key" ]; then
  echo "build-production-image: --kubernetes-repo needs --kubernetes-key FILE (its signing key)" >&2
  exit 2
fi
if [ -z "$k8s_repo" ] && [ -n "$k8s_key" ]; then
  echo "build-production-image: --kubernetes-key without --kubernetes-repo" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "build-production-image: run as root (mmdebstrap --mode=root chroots and mounts)" >&2
  exit 1
fi
for tool in mmdebstrap mksquashfs; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt install mmdebstrap squashfs-tools)" >&2; exit 1; }
done

if [ -z "$out" ]; then
  recipe=$( { cat "$0"; find "$here/production" -type f | sort | xargs cat;
              echo "$suite $mirror $security $kernel $include $k8s_repo";
              [ -z "$k8s_key" ] || cat "$k8s_key"; } | sha256sum | cut -c1-16)
  cache=${BOOTD_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootd/production-image}
  out="$cache/$recipe"
  if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/rootfs.squashfs" ]; then
    echo "$out"
    exit 0
  fi
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# What every node runs. Kubernetes' own packages (kubelet pulls conntrack, socat,
# kubernetes-cni, cri-tools) come from their repository in the customize step.
packages=(
  "$kernel" initramfs-tools busybox zstd       # kernel + the boot=bootd initramfs
  systemd systemd-sysv systemd-resolved systemd-timesyncd dbus udev kmod
  iproute2 iputils-ping ca-certificates curl   # networkd DHCP; curl fetches join.sh
  openssh-server
  containerd iptables conntrack socat ethtool ebtables
  procps less
)
if [ -n "$include" ]; then
  IFS=, read -r -a extra <<< "$include"
  packages+=("${extra[@]}")
fi

export BOOTD_K8S_REPO=$k8s_repo BOOTD_K8S_KEY=$k8s_key BOOTD_IMAGE_OUT=$out
export BOOTD_PRODUCTION_DIR=$here/production

# Setup hook: the initramfs configuration is in place before the kernel's postinst builds
# the initramfs. Customize hook: units, config, Kubernetes packages, then the kernel and
# initramfs are taken out of /boot (the squashfs does not need them).
mmdebstrap --variant=minbase --mode=root --format=directory \
  --components=main,non-free-firmware \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --setup-hook='cp -a "$BOOTD_PRODUCTION_DIR/initramfs/." "$1/"' \
  --customize-hook='"$BOOTD_PRODUCTION_DIR/customize.sh" "$1"' \
  "$suite" "$work/root" \
  "deb $mirror $suite main non-free-firmware" \
  "deb $mirror $suite-updates main non-free-firmware" \
  "deb $security $suite-security main non-free-firmware" >&2

rm -f "$out/rootfs.squashfs.tmp"
# squashfs keeps security.* xattrs (file capabilities, e.g. ping's) but not POSIX ACLs
# (systemd-tmpfiles puts some on /var/log/journal, which is in RAM anyway): hush those.
mksquashfs "$work/root" "$out/rootfs.squashfs.tmp" -noappend -comp zstd -quiet \
  2> >(grep -v '^Unrecognised xattr prefix system.posix_acl_' >&2) >/dev/null
mv "$out/rootfs.squashfs.tmp" "$out/rootfs.squashfs"
cat > "$out/bootd-image.yaml" <<EOF
# bootd config: this image under images: (paths as built; move them where bootd reads).
images:
  debian:
    kernel: $out/vmlinuz
    initrd: $out/initrd.img
    rootfs: $out/rootfs.squashfs
    cmdline: "boot=bootd panic=30 console=tty0 console=ttyS0,115200n8"
EOF
echo "$out"
