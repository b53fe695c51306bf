# shellcheck shell=bash
# The generic Debian kernel (linux-image-6.1.0-*-amd64, not cloud: cloud lacks NVDIMM, DAX and KVM modules),
# downloaded once with apt-get download, extracted with dpkg-deb -x, indexed with depmod -b.
# Sourced after common.sh. Sets KERNEL_VERSION, KERNEL_ROOT (extracted tree), KERNEL_IMAGE (bzImage).

lab_kernel_package() {
    # LAB_KERNEL_PACKAGE pins a package; otherwise the current ABI that linux-image-amd64 points to.
    if [ -n "${LAB_KERNEL_PACKAGE:-}" ]; then
        echo "$LAB_KERNEL_PACKAGE"
        return
    fi
    local pkg
    pkg="$(apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1)"
    if [ -z "$pkg" ]; then
        # No package list (offline, or apt-get update never ran): reuse the newest cached download.
        pkg="$(ls "$LAB_BUILD/debs" 2>/dev/null | sed -n 's/^\(linux-image-6\.1\.0-[0-9]*-amd64\)_.*\.deb$/\1/p' |
            sort -V | tail -n1)"
    fi
    [ -n "$pkg" ] || lab_die "cannot resolve the kernel package (run apt-get update, or set LAB_KERNEL_PACKAGE)"
    echo "$pkg"
}

lab_fetch_kernel() {
    local pkg deb
    pkg="$(lab_kernel_package)"
    mkdir -p "$LAB_BUILD/debs"
    deb="$(ls "$LAB_BUILD/debs/${pkg}"_*.deb 2>/dev/null | sort -V | tail -n1 || true)"
    if [ -z "$deb" ]; then
        lab_log "kernel: downloading $pkg"
        (cd "$LAB_BUILD/debs" && apt-get -q -o APT::Sandbox::User=root download "$pkg" >&2) ||
            lab_die "apt-get download $pkg failed"
        deb="$(ls "$LAB_BUILD/debs/${pkg}"_*.deb | sort -V | tail -n1)"
    fi
    KERNEL_VERSION="${pkg#linux-image-}"
    KERNEL_ROOT="$LAB_BUILD/kernel"
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
# modules it depends on (insmod order), each once. Names may use - or _.
lab_resolve_modules() {
    local dep="$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.dep"
    awk -v want="$*" '
        function norm(s) { gsub(/-/, "_", s); return s }
        function name_of(path,   n) { n = path; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n); return norm(n) }
        function visit(n,   i, parts, k) {
            if (n in done) return
            if (!(n in path)) { printf "unknown module: %s\n", n > "/dev/stderr"; failed = 1; return }
            done[n] = 1
            k = split(deps[n], parts, " ")
            # modules.dep lists a module'"'"'s dependencies with the ones it needs last loaded first
            for (i = k; i >= 1; i--) visit(name_of(parts[i]))
            print path[n]
        }
        {
            p = $1; sub(/:$/, "", p); n = name_of(p)
            path[n] = p; d = $0; sub(/^[^:]*:[ ]*/, "", d); deps[n] = d
        }
        END {
            k = split(want, w, " ")
            for (i = 1; i <= k; i++) visit(norm(w[i]))
            exit failed
        }' "$dep"
}

# Copy the named modules and their dependencies into ROOT/lib/modules/VERSION and index them with depmod (so
# request_module from the kernel works through busybox modprobe); write the insmod order to ROOT/etc/modules.order.
lab_stage_modules() {
    local root="$1"
    shift
    local order m dst
    order="$(lab_resolve_modules "$@")" || lab_die "module resolution failed for: $*"
    dst="$root/lib/modules/$KERNEL_VERSION"
    mkdir -p "$dst" "$root/etc"
    : >"$root/etc/modules.order"
    for m in $order; do
        mkdir -p "$dst/$(dirname "$m")"
        cp "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/$m" "$dst/$m"
        echo "/lib/modules/$KERNEL_VERSION/$m" >>"$root/etc/modules.order"
    done
    cp "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.builtin" \
        "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.builtin.modinfo" \
        "$KERNEL_ROOT/lib/modules/$KERNEL_VERSION/modules.order" "$dst/"
    depmod -b "$root" "$KERNEL_VERSION"
}
