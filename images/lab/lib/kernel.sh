# shellcheck shell=bash
# The generic Debian kernel (linux-image-6.1.0-*-amd64, not cloud: cloud lacks NVDIMM, DAX, KVM and VFIO modules),
# pinned below, downloaded once with apt-get download, extracted with dpkg-deb -x, indexed with depmod -b.
# Sourced after common.sh. Sets KERNEL_VERSION, KERNEL_ROOT (extracted tree), KERNEL_IMAGE (bzImage).

# The lab's kernel, pinned (package and exact Debian version) so the image and the kernel rules the lab tests see
# (DMA pinnability depends on the kernel version) do not change under us when the archive moves on. To move the
# pin: pick the new package from `apt-cache depends linux-image-amd64`, its version from `apt-cache policy`, and
# rerun the lab tests. LAB_KERNEL_PACKAGE=NAME[=VERSION] overrides it for one build.
LAB_KERNEL_PIN="linux-image-6.1.0-48-amd64=6.1.172-1"

# A second guest kernel, for the virtual IOMMU scenario only: Debian 6.1 has no CONFIG_VIRTIO_IOMMU; the generic
# 6.12 kernel of bookworm-backports has it (=m, virtio-iommu.ko.xz) and CONFIG_ACPI_VIOT=y, and also nvme,
# virtio_pci, virtio_pmem, nd_pmem, FS_DAX and ext4. Pinned as the lab's kernel is; fetched from
# bookworm-backports with apt-get and a private sources list (the host's apt configuration is not touched).
# LINUX_VIOMMU_KERNEL_PACKAGE=NAME=VERSION overrides it for one build.
LINUX_VIOMMU_KERNEL_PIN="linux-image-6.12.95+deb12-amd64=6.12.95-1~bpo12+1"

lab_kernel_package() {
    echo "${LAB_KERNEL_PACKAGE:-$LAB_KERNEL_PIN}"
}

lab_fetch_kernel() {
    lab_fetch_kernel_from "$(lab_kernel_package)" "$LAB_BUILD/kernel" ""
}

# apt-get options for bookworm-backports through a private sources list and state under LAB_BUILD (updated once).
lab_backports_apt_opts() {
    local d="$LAB_BUILD/apt-bookworm-backports"
    mkdir -p "$d/lists/partial" "$d/cache/archives/partial"
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$d/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache" -o "APT::Get::List-Cleanup=0")
    if ! ls "$d/lists/"*Packages* >/dev/null 2>&1; then
        apt-get -q "${opts[@]}" update >&2 || lab_die "apt-get update of bookworm-backports failed"
    fi
    printf '%s\n' "${opts[@]}"
}

# The guest kernel of the virtual IOMMU scenario (LINUX_VIOMMU_KERNEL_PIN), extracted under LAB_BUILD/kernel-viommu.
lab_fetch_viommu_kernel() {
    lab_fetch_kernel_from "${LINUX_VIOMMU_KERNEL_PACKAGE:-$LINUX_VIOMMU_KERNEL_PIN}" "$LAB_BUILD/kernel-viommu" backports
}

# lab_fetch_kernel_from NAME=VERSION ROOT [backports]: download (once), extract into ROOT, depmod.
lab_fetch_kernel_from() {
    local spec="$1" root="$2" suite="${3:-}" pkg ver deb
    local apt_opts=()
    if [ "$suite" = backports ]; then
        mapfile -t apt_opts < <(lab_backports_apt_opts)
    fi
    pkg="${spec%%=*}"
    ver=''
    [ "$spec" = "$pkg" ] || ver="${spec#*=}"
    mkdir -p "$LAB_BUILD/debs"
    # Debian file names spell the version with ':' as '%3a'; the lab kernels carry no epoch.
    if [ -n "$ver" ]; then
        deb="$LAB_BUILD/debs/${pkg}_${ver//:/%3a}_amd64.deb"
        [ -f "$deb" ] || deb=''
    else
        deb="$(ls "$LAB_BUILD/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
    fi
    if [ -z "$deb" ]; then
        lab_log "kernel: downloading $spec"
        (cd "$LAB_BUILD/debs" && apt-get -q "${apt_opts[@]}" -o APT::Sandbox::User=root download "$spec" >&2) ||
            lab_die "apt-get download $spec failed (apt-get update; if the archive dropped that version, move LAB_KERNEL_PIN in images/lab/lib/kernel.sh)"
        if [ -n "$ver" ]; then
            deb="$LAB_BUILD/debs/${pkg}_${ver//:/%3a}_amd64.deb"
        else
            deb="$(ls "$LAB_BUILD/debs/${pkg}"_*.deb | sort -V | tail -n1)"
        fi
        [ -f "$deb" ] || lab_die "apt-get download $spec wrote no $deb"
    fi
    KERNEL_VERSION="${pkg#linux-image-}"
    KERNEL_ROOT="$root"
    KERNEL_IMAGE="$KERNEL_ROOT/boot/vmlinuz-$KERNEL_VERSION"
    if [ "$(cat "$KERNEL_ROOT/.from" 2>/dev/null)" != "$(basename "$deb")" ]; then
        lab_log "kernel: extracting $(basename "$deb")"
        rm -rf "$KERNEL_ROOT"
        mkdir -p "$KERNEL_ROOT"
        dpkg-deb -x "$deb" "$KERNEL_ROOT"
        depmod -b "$KERNEL_ROOT" "$KERNEL_VERSION"
        basename "$deb" >"$KERNEL_ROOT/.from"
    else
        lab_log "kernel: $KERNEL_VERSION (cached)"
    fi
    [ -f "$KERNEL_IMAGE" ] || lab_die "no kernel image at $KERNEL_IMAGE"
}

# Print the module files (paths relative to lib/modules/VERSION) needed for the named modules, each after the
# modules it depends on (insmod order), each once. Names may use - or _. A module built into the kernel
# (modules.builtin: 6.12 builds virtio_pci and virtio_console in) needs nothing and is skipped.
lab_resolve_modules() {
    local dep="$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.dep"
    local builtin="$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.builtin"
    awk -v want="$*" '
        function norm(s) { gsub(/-/, "_", s); return s }
        function name_of(path,   n) { n = path; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); return norm(n) }
        function visit(n,   i, parts, k) {
            if (n in done || n in inkernel) return
            if (!(n in path)) { printf "unknown module: %s\n", n > "/dev/stderr"; failed = 1; return }
            done[n] = 1
            k = split(deps[n], parts, " ")
            # modules.dep lists a module'"'"'s dependencies with the ones it needs last loaded first
            for (i = k; i >= 1; i--) visit(name_of(parts[i]))
            print path[n]
        }
        FILENAME == builtin_file { inkernel[name_of($1)] = 1; next }
        {
            p = $1; sub(/:$/, "", p); n = name_of(p)
            path[n] = p; d = $0; sub(/^[^:]*:[ ]*/, "", d); deps[n] = d
        }
        END {
            k = split(want, w, " ")
            for (i = 1; i <= k; i++) visit(norm(w[i]))
            exit failed
        }' builtin_file="$builtin" "$builtin" "$dep"
}

# Copy the named modules and their dependencies into ROOT/lib/modules/VERSION and index them with depmod (so
# request_module from the kernel works through busybox modprobe); write the insmod order to ROOT/etc/modules.order,
# or to ROOT/etc/NAME with `--order NAME` first (a set loaded only on request; it may repeat modules of another set).
lab_stage_modules() {
    local root="$1" list=modules.order
    shift
    if [ "${1:-}" = --order ]; then
        list="$2"
        shift 2
    fi
    local order m dst
    order="$(lab_resolve_modules "$@")" || lab_die "module resolution failed for: $*"
    dst="$root/lib/modules/$KERNEL_VERSION"
    mkdir -p "$dst" "$root/etc"
    : >"$root/etc/$list"
    for m in $order; do
        mkdir -p "$dst/$(dirname "$m")"
        case "$m" in
        # Newer Debian kernels ship xz-compressed modules; busybox insmod takes them uncompressed.
        *.ko.xz)
            xz -dc "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/$m" >"$dst/${m%.xz}"
            m="${m%.xz}"
            ;;
        *) cp "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/$m" "$dst/$m" ;;
        esac
        echo "/lib/modules/$KERNEL_VERSION/$m" >>"$root/etc/$list"
    done
    cp "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.builtin" \
        "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.builtin.modinfo" \
        "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.order" "$dst/"
    depmod -b "$root" "$KERNEL_VERSION"
}
