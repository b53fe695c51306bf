# shellcheck shell=bash
# Filling an initramfs staging tree: busybox with its applet links, dynamically linked host tools with the
# libraries ldd lists and the loader. Sourced after common.sh.

# A minimal tree: busybox-static as /bin/busybox with one link per applet, and the usual mount points.
lab_stage_busybox() {
    local root="$1" bb applet
    bb="$(command -v busybox || true)"
    [ -n "$bb" ] || lab_die "busybox not found (scripts/setup-host.sh installs busybox-static)"
    lab_is_static "$bb" || lab_die "$bb is not static (install busybox-static)"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,mnt,etc,root}
    cp "$bb" "$root/bin/busybox"
    for applet in $("$bb" --list-full); do
        [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
}

# Copy a dynamically linked executable to the same path under ROOT with every library ldd lists (and the
# loader), so it runs in an initramfs without a distribution. Symlinked names (mkfs.ext4 -> mke2fs) are copied
# as the file they resolve to.
lab_stage_dynamic() {
    lab_stage_dynamic_as "$1" "$2" "$2"
}

# The same for an executable found at SRC (e.g. in an extracted package), installed as DEST under ROOT.
lab_stage_dynamic_as() {
    local root="$1" exe="$2" dest="$3" lib
    [ -x "$exe" ] || lab_die "$exe missing (scripts/setup-host.sh installs it)"
    mkdir -p "$root$(dirname "$dest")"
    rm -f "$root$dest"
    cp -L "$exe" "$root$dest"
    for lib in $(ldd "$exe" | awk '/=> \//{print $3} /^[ \t]*\//{print $1}'); do
        mkdir -p "$root$(dirname "$lib")"
        [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
    done
}

# True when the executable needs no shared library (static or static-pie).
lab_is_static() {
    case "$(ldd "$1" 2>&1 || true)" in
    *"statically linked"* | *"not a dynamic executable"*) return 0 ;;
    *) return 1 ;;
    esac
}
