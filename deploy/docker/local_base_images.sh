#!/usr/bin/env bash
# Base images for docker-compose.yml built on this machine, for hosts that reach a
# Debian mirror and a Python package index but no image registry.
#
#   jetserve-base:bookworm  Debian bookworm (debootstrap minbase) with python3, venv,
#                           CA certificates and wget: stands in for python:3.11-slim-bookworm
#                           (the Dockerfiles' PYTHON_IMAGE build argument)
#   jetserve-nats:local     that base plus a nats-server binary: stands in for the nats image
#
# Then:
#   export PYTHON_IMAGE=jetserve-base:bookworm NATS_IMAGE=jetserve-nats:local
#   docker compose up -d --build
#
# Options (environment):
#   DEBIAN_MIRROR  the Debian archive to bootstrap from (default: the first one apt uses,
#                  read from /etc/apt/sources.list*)
#   WHEELS_DIR     a folder of wheels pip in the image may install from (find-links), e.g.
#                  a CPU-only torch wheel; the newest torch wheel there is pinned, so the
#                  CPU worker image gets that build and not the CUDA-bundling default
#   NATS_SERVER    the nats-server binary (default: the one on PATH or in .venv/bin)
#   WORK_DIR       where the root filesystem is built (default: /tmp/jetserve-base)
# Needs root (debootstrap), debootstrap and a running Docker engine.
set -euo pipefail
cd "$(dirname "$0")/../.."

BASE_IMAGE=${BASE_LOCAL_IMAGE:-jetserve-base:bookworm}
NATS_IMAGE=${NATS_LOCAL_IMAGE:-jetserve-nats:local}
WORK_DIR=${WORK_DIR:-/tmp/jetserve-base}
ROOTFS="$WORK_DIR/rootfs"

step() { printf '\n==> %s\n' "$*"; }

apt_mirror() {
  # deb822 (.sources: "URIs: ...") or one-line ("deb URI suite ...") entries; the first
  # one whose suites include bookworm.
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") { print uri; exit } }
    /^deb / && $3 == "bookworm" { print $2; exit }
  ' "${files[@]}" 2>/dev/null | head -n 1
}

MIRROR=${DEBIAN_MIRROR:-$(apt_mirror)}
if [ -z "$MIRROR" ]; then
  echo "no Debian bookworm mirror found in /etc/apt/sources.list*: set DEBIAN_MIRROR" >&2
  exit 2
fi
NATS_SERVER=${NATS_SERVER:-$(command -v nats-server || echo .venv/bin/nats-server)}
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "no Docker engine answers (start dockerd)" >&2; exit 2; }
[ -x "$NATS_SERVER" ] || { echo "no nats-server binary at $NATS_SERVER: set NATS_SERVER" >&2; exit 2; }

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  step "debootstrap bookworm from $MIRROR into $ROOTFS (a few minutes)"
  rm -rf "$ROOTFS"
  mkdir -p "$WORK_DIR"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,wget \
    bookworm "$ROOTFS" "$MIRROR"
else
  step "reusing the root filesystem in $ROOTFS"
fi

step "this machine's CA bundle (pip inside a build verifies the index with it)"
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
rm -rf "$ROOTFS/opt/wheels" "$ROOTFS/etc/pip.conf" "$ROOTFS/etc/pip-constraints.txt"
{
  echo "[global]"
  echo "cert = /etc/ssl/certs/ca-certificates.crt"
} > "$ROOTFS/etc/pip.conf"
if [ -n "${WHEELS_DIR:-}" ]; then
  step "wheels from $WHEELS_DIR (pip find-links in the image)"
  mkdir -p "$ROOTFS/opt/wheels"
  cp "$WHEELS_DIR"/*.whl "$ROOTFS/opt/wheels/"
  echo "find-links = /opt/wheels" >> "$ROOTFS/etc/pip.conf"
  torch_wheel=$(find "$ROOTFS/opt/wheels" -name 'torch-*.whl' -printf '%f\n' | sort -V | tail -n 1)
  if [ -n "$torch_wheel" ]; then
    version=$(echo "$torch_wheel" | cut -d- -f2)
    echo "torch==$version" > "$ROOTFS/etc/pip-constraints.txt"
    echo "constraint = /etc/pip-constraints.txt" >> "$ROOTFS/etc/pip.conf"
    echo "torch pinned to $version"
  fi
fi
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*

step "docker import -> $BASE_IMAGE"
tar -C "$ROOTFS" -c . | docker import - "$BASE_IMAGE" >/dev/null

step "docker build -> $NATS_IMAGE ($("$NATS_SERVER" --version))"
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$NATS_SERVER" "$context/nats-server"
cat > "$context/Dockerfile" <<EOF
FROM $BASE_IMAGE
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 8222
ENTRYPOINT ["nats-server"]
EOF
docker build -q -t "$NATS_IMAGE" "$context" >/dev/null

step "done"
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "^(${BASE_IMAGE}|${NATS_IMAGE})  "
echo "export PYTHON_IMAGE=$BASE_IMAGE NATS_IMAGE=$NATS_IMAGE"
