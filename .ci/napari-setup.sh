#!/usr/bin/env bash
# System libraries for the napari tests: an X server (Xvfb) and what Qt 6's xcb platform plugin and OpenGL
# (Mesa, software rendering) load. Idempotent and quiet: does nothing when all are installed already.
set -euo pipefail

PACKAGES=(
    xvfb xauth                                   # the X server (pytest-xvfb starts it) and xvfb-run's helper
    libgl1 libegl1 libglx-mesa0 libgl1-mesa-dri  # OpenGL for vispy: GLX with Mesa's software renderer
    libglib2.0-0 libdbus-1-3 libfontconfig1 fonts-dejavu-core
    libx11-xcb1 libxkbcommon0 libxkbcommon-x11-0
    libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0
    libxcb-shape0 libxcb-xfixes0 libxcb-xkb1
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } > "$log" 2>&1
then
    cat "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
