#!/usr/bin/env bash
# mmdebstrap customize hook for build-production-image.sh: $1 is the new root, run from
# outside it. Environment: BOOTD_PRODUCTION_DIR, BOOTD_IMAGE_OUT, BOOTD_K8S_REPO,
# BOOTD_K8S_KEY.
set -euo pipefail
root=$1
in_root() { chroot "$root" "$@"; }

# Units, networkd config, journald/sysctl/modules drop-ins, the join helper.
cp -a "$BOOTD_PRODUCTION_DIR/rootfs/." "$root/"

# containerd as kubeadm expects it: the systemd cgroup driver (kubelet's default).
mkdir -p "$root/etc/containerd"
in_root containerd config default \
  | sed 's/SystemdCgroup = false/SystemdCgroup = true/' > "$root/etc/containerd/config.toml"
grep -q 'SystemdCgroup = true' "$root/etc/containerd/config.toml"

if [ -n "${BOOTD_K8S_REPO:-}" ]; then
  mkdir -p "$root/etc/apt/keyrings"
  if grep -q -- '-----BEGIN PGP PUBLIC KEY BLOCK-----' "$BOOTD_K8S_KEY"; then
    key=/etc/apt/keyrings/kubernetes.asc
  else
    key=/etc/apt/keyrings/kubernetes.gpg
  fi
  install -m 0644 "$BOOTD_K8S_KEY" "$root$key"
  echo "deb [signed-by=$key] ${BOOTD_K8S_REPO%/}/ /" > "$root/etc/apt/sources.list.d/kubernetes.list"
  # systemd-resolved's postinst made /etc/resolv.conf a link to its stub, which does not run
  # in the chroot: use the host's resolver for this step (the link is put back below).
  rm -f "$root/etc/resolv.conf"
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  # Only the new source: Debian's lists are still there from mmdebstrap's own update.
  in_root apt-get update -q -o Dir::Etc::sourcelist=sources.list.d/kubernetes.list \
    -o Dir::Etc::sourceparts=- -o APT::Get::List-Cleanup=0
  DEBIAN_FRONTEND=noninteractive in_root apt-get install -y -q --no-install-recommends \
    kubelet kubeadm kubectl
  in_root apt-mark hold kubelet kubeadm kubectl
  in_root systemctl enable kubelet.service
fi

in_root systemctl enable systemd-networkd.service systemd-resolved.service \
  bootd-join.service bootd-ssh-hostkeys.service var-lib-kubelet.mount var-lib-containerd.mount
ln -sf ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"

# Nothing node-specific in the image: no SSH host keys, no machine id (both made at boot),
# a placeholder name until join.sh sets the node's own.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
echo bootd-node > "$root/etc/hostname"
in_root passwd -l root >/dev/null

# The kernel and initramfs boot from bootd's HTTP, not from inside the squashfs.
out=$BOOTD_IMAGE_OUT
set -- "$root"/boot/vmlinuz-*
[ $# -eq 1 ] || { echo "customize: expected one kernel in /boot, found: $*" >&2; exit 1; }
version=${1#"$root"/boot/vmlinuz-}
cp "$root/boot/vmlinuz-$version" "$out/vmlinuz"
cp "$root/boot/initrd.img-$version" "$out/initrd.img"
rm -f "$root"/boot/vmlinuz-* "$root"/boot/initrd.img-* "$root"/boot/System.map-* \
  "$root"/vmlinuz* "$root"/initrd.img*
in_root dpkg-query -W -f '${Package} ${Version}\n' > "$out/packages.txt"
in_root apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
