# shellcheck shell=bash
# The peer VMM inside the lab: QEMU from Debian bookworm's qemu-system-x86, pinned (package and version) so the peer
# the table compares against does not move with the host's QEMU (the host may run another version, e.g. from
# backports). The packages are downloaded with apt-get download and extracted; the binary's shared libraries are
# the ones ldd resolves on this host (setup-host.sh installs qemu-system-x86, which pulls them in), and the
# firmware it needs for a -kernel boot on the pc machine (SeaBIOS, linuxboot_dma, kvmvapic) comes from the pinned
# seabios and qemu-system-data packages. Staged into its own archive (build/out/peer.cpio.gz) that only
# `run-scenario.sh --peer` adds to the lab. Sourced after common.sh and stage.sh.

LAB_QEMU_PINS=(
    "qemu-system-x86=1:7.2+dfsg-7+deb12u18+b2"
    "qemu-system-data=1:7.2+dfsg-7+deb12u18"
    "seabios=1.16.2-1"
)

# Stage the pinned QEMU into ROOT: /usr/bin/qemu-system-x86_64, its libraries, /usr/share/qemu and
# /usr/share/seabios with the firmware files a -kernel boot reads.
lab_stage_qemu() {
    local root="$1" debs="$LAB_BUILD/debs/peer" x="$LAB_BUILD/peer-extract" spec pkg ver deb f
    mkdir -p "$debs"
    rm -rf "$x"
    mkdir -p "$x"
    for spec in "${LAB_QEMU_PINS[@]}"; do
        pkg="${spec%%=*}"
        ver="${spec#*=}"
        # Debian file names spell the epoch's ':' as '%3a'.
        deb="$debs/${pkg}_${ver/:/%3a}_$([ "$pkg" = qemu-system-x86 ] && echo amd64 || echo all).deb"
        if [ ! -f "$deb" ]; then
            lab_log "peer: downloading $spec"
            (cd "$debs" && apt-get -q -o APT::Sandbox::User=root download "$spec" >&2) ||
                lab_die "apt-get download $spec failed (apt-get update; if the archive dropped it, move LAB_QEMU_PINS in images/lab/lib/qemu.sh)"
            [ -f "$deb" ] || lab_die "apt-get download $spec wrote no $deb"
        fi
        dpkg-deb -x "$deb" "$x"
    done
    lab_stage_dynamic_as "$root" "$x/usr/bin/qemu-system-x86_64" /usr/bin/qemu-system-x86_64
    mkdir -p "$root/usr/share/qemu" "$root/usr/share/seabios"
    for f in linuxboot_dma.bin linuxboot.bin kvmvapic.bin pvh.bin; do
        cp -L "$x/usr/share/qemu/$f" "$root/usr/share/qemu/"
    done
    for f in bios.bin bios-256k.bin; do
        cp -L "$x/usr/share/seabios/$f" "$root/usr/share/seabios/"
    done
    "$root/usr/bin/qemu-system-x86_64" --version | head -n1 | sed 's/^/[peer] /' >&2 ||
        lab_die "the staged QEMU does not run on this host"
}
