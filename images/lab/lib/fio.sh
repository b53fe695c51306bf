# shellcheck shell=bash
# fio for the Linux guest image, built static from Debian's source package so the guest image stays small
# (Debian's fio binary pulls ~80 MiB of libraries). The source comes through apt-get with a private deb-src list
# (the host's apt configuration is not touched); the binary is cached in build/fio/. Sourced after common.sh.
# Sets FIO_BIN.

# Pinned like the kernel: the guest's fio, and so the peer table's workload, does not change under us.
LAB_FIO_PIN="fio=3.33-3"

lab_build_fio() {
    local ver="${LAB_FIO_PIN#fio=}" dir="$LAB_BUILD/fio" apt src
    FIO_BIN="$dir/fio-$ver"
    if [ -x "$FIO_BIN" ] && lab_is_static "$FIO_BIN"; then
        lab_log "fio: $ver (cached)"
        return 0
    fi
    apt="$dir/apt"
    mkdir -p "$apt/lists/partial" "$apt/etc"
    echo "deb-src http://deb.debian.org/debian bookworm main" >"$apt/etc/sources.list"
    local opts=(-q -o "Dir::Etc::SourceList=$apt/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$apt/lists" -o APT::Sandbox::User=root)
    if [ ! -f "$dir/fio_${ver%-*}.orig.tar.gz" ]; then
        lab_log "fio: downloading the source of $LAB_FIO_PIN"
        apt-get "${opts[@]}" update >&2 || lab_die "apt-get update (deb-src for fio) failed"
        (cd "$dir" && apt-get "${opts[@]}" source --download-only "$LAB_FIO_PIN" >&2) ||
            lab_die "apt-get source $LAB_FIO_PIN failed (if the archive dropped that version, move LAB_FIO_PIN in images/lab/lib/fio.sh)"
    fi
    src="$dir/src"
    rm -rf "$src"
    mkdir -p "$src"
    tar -xzf "$dir/fio_${ver%-*}.orig.tar.gz" -C "$src" --strip-components=1
    lab_log "fio: building static"
    # Only the engines the peer scenario uses (psync, sync): every optional library off, so --build-static links.
    (cd "$src" && ./configure --build-static --disable-native --disable-numa --disable-rdma --disable-rados \
        --disable-rbd --disable-http --disable-gfapi --disable-libnfs --disable-pmem --disable-xnvme \
        --disable-libzbc --disable-tcmalloc --disable-dfs --disable-lex >"$dir/configure.log" 2>&1 &&
        make -j"$(nproc)" fio >"$dir/make.log" 2>&1) || lab_die "fio build failed: see $dir/configure.log, $dir/make.log"
    lab_is_static "$src/fio" || lab_die "fio is not static"
    strip -o "$FIO_BIN" "$src/fio"
    rm -rf "$src"
    lab_log "fio: $(du -h "$FIO_BIN" | cut -f1)"
}
