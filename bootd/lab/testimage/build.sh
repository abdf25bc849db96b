#!/usr/bin/env bash
# Build the test image that `bootd lab` and the e2e tests boot, from Debian packages only:
# the cloud kernel and the modules the initramfs needs, busybox-static, squashfs-tools.
# It ships inside the package (bootd/lab/testimage). Output (printed on stdout): a
# directory with vmlinuz, initrd.img and rootfs.squashfs, cached outside the package and
# rebuilt only when this recipe changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
recipe=$(cat "$0" "$here"/init "$here"/udhcpc.script "$here"/kubeadm | sha256sum | cut -c1-16)
cache=${BOOTD_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/bootd/test-image}
out="$cache/$recipe"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -s "$out/rootfs.squashfs" ]; then
  echo "$out"
  exit 0
fi
for tool in busybox mksquashfs cpio; do
  command -v "$tool" >/dev/null || { echo "needs $tool (busybox-static, squashfs-tools, cpio)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

# kernel + modules from the current Debian cloud kernel package
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1)
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"

# initramfs: busybox, /init, the modules
ird="$work/initrd"
mkdir -p "$ird/bin" "$ird/etc" "$ird/lib/modules"
cp "$(command -v busybox)" "$ird/bin/busybox"
install -m 0755 "$here/init" "$ird/init"
install -m 0755 "$here/udhcpc.script" "$ird/etc/udhcpc.script"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         failover net_failover virtio_net loop squashfs overlay; do
  f=$(find "$work/kernel/lib/modules" -name "$m.ko*" | head -n 1)
  [ -n "$f" ] || { echo "module $m not found in $kpkg" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "$ird/lib/modules/$m.ko" ;;
    *) cp "$f" "$ird/lib/modules/$m.ko" ;;
  esac
done
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -9) > "$out/initrd.img.tmp"

# rootfs: busybox userland and the kubeadm test double
rfs="$work/rootfs"
mkdir -p "$rfs/bin" "$rfs/usr/bin" "$rfs/etc/default" "$rfs/root" "$rfs/tmp"
cp "$(command -v busybox)" "$rfs/bin/busybox"
for app in $("$rfs/bin/busybox" --list); do
  [ -e "$rfs/bin/$app" ] || ln -s busybox "$rfs/bin/$app"
done
install -m 0755 "$here/kubeadm" "$rfs/usr/bin/kubeadm"
echo "bootd test image" > "$rfs/etc/motd"
rm -f "$out/rootfs.squashfs.tmp"
mksquashfs "$rfs" "$out/rootfs.squashfs.tmp" -noappend -comp gzip -quiet >/dev/null

for f in vmlinuz initrd.img rootfs.squashfs; do mv "$out/$f.tmp" "$out/$f"; done
echo "$out"
