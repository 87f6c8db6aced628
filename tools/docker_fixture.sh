#!/usr/bin/env bash
# Builds SWE-bench-shaped images with no registry (see ../shared/notes/swebench-harness.md):
#
#   tools/docker_fixture.sh base                  prints the base image's name, building it once:
#       a `debootstrap --variant=minbase` Debian with python3, pytest, git and patch, and a
#       stand-in conda under the official file names (/opt/miniconda3/bin/activate,
#       etc/profile.d/conda.sh, envs/testbed, the /root/.bashrc line); `docker import`ed and
#       named by the hash of this script, its root kept in $PROTEGE_CACHE/images.
#   tools/docker_fixture.sh instance NAME DIR     commits DIR as the git repository /testbed
#       (one commit, then the empty "SWE-bench" commit the official images add) into image NAME;
#       prints the base commit's sha.
set -euo pipefail
CACHE="${PROTEGE_CACHE:-$HOME/.cache/protege}/images"
# The base image is named by the hash of what builds it (this script's base()).
HASH="$(sed -n '/^base() {/,/^}/p' "$0" | sha256sum | cut -c1-12)"
BASE="protege-fixture-base:$HASH"

base() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then echo "$BASE"; return; fi
    mkdir -p "$CACHE"
    local root="$CACHE/root-$HASH"
    if [ ! -e "$root/.done" ]; then
        rm -rf "$root"
        debootstrap --variant=minbase --include=git,python3,python3-pytest,patch,procps \
            bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$CACHE/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
        local c="$root/opt/miniconda3"
        mkdir -p "$c/etc/profile.d" "$c/bin" "$c/envs/testbed/bin" "$c/envs/base/bin"
        cat > "$c/etc/profile.d/conda.sh" <<'SH'
# A stand-in for conda's shell function: `conda activate ENV` puts ENV's bin first on PATH.
conda() {
    case "${1:-}" in
        activate) export CONDA_DEFAULT_ENV="${2:-base}"; export PATH="/opt/miniconda3/envs/${2:-base}/bin:$PATH" ;;
        deactivate) unset CONDA_DEFAULT_ENV ;;
    esac
}
SH
        printf '. /opt/miniconda3/etc/profile.d/conda.sh\nconda activate "${1:-base}"\n' > "$c/bin/activate"
        ln -sf /usr/bin/python3 "$c/envs/testbed/bin/python"
        printf '#!/bin/sh\nexec /usr/bin/python3 -m pytest "$@"\n' > "$c/envs/testbed/bin/pytest"
        chmod +x "$c/envs/testbed/bin/pytest"
        echo 'source /opt/miniconda3/etc/profile.d/conda.sh && conda activate testbed' >> "$root/root/.bashrc"
        rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
        touch "$root/.done"
    fi
    tar -C "$root" --exclude=./.done -c . | docker import \
        --change 'WORKDIR /testbed' \
        --change 'ENV PATH=/opt/miniconda3/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE" >/dev/null
    echo "$BASE"
}

instance() {
    local name="$1" dir="$2" b c
    b="$(base)"
    c="$(docker create "$b" sleep infinity)"
    trap 'docker rm -f "$c" >/dev/null 2>&1 || true' RETURN
    docker cp "$dir/." "$c:/testbed" >/dev/null
    docker start "$c" >/dev/null
    docker exec -w /testbed "$c" sh -c 'rm -rf .git && git init -q && git add -A \
        && git -c user.name=fixture -c user.email=f@x commit -qm base \
        && git -c user.name=fixture -c user.email=f@x commit -q --allow-empty -m SWE-bench \
        && git rev-parse HEAD~1'
    docker stop -t 0 "$c" >/dev/null
    local old
    old="$(docker image inspect -f '{{.Id}}' "$name" 2>/dev/null || true)"
    docker commit "$c" "$name" >/dev/null
    # The image this name held before is no one's now: do not let reruns fill the disk.
    if [ -n "$old" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
}

case "${1:-}" in
    base) base ;;
    instance) instance "$2" "$3" ;;
    *) echo "usage: $0 base | instance NAME DIR" >&2; exit 2 ;;
esac
