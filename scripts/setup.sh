#!/usr/bin/env bash
# Set up SegmentWithSAM on a Debian machine: system packages (Python venv support, the Colin27 MRI and the
# InVesalius head CT), then a virtual environment in .venv with the core and the `segmentwithsam` command.
#   bash scripts/setup.sh          # to run segmentwithsam
#   bash scripts/setup.sh --dev    # also the test tools (pytest, hypothesis, ruff, slicer-core) and the web app
#                                  # with what its browser tests need (Chromium, chromedriver, Mesa's EGL)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--dev" ]; then extras="[test,web]"; fi

packages=()
command -v python3 >/dev/null 2>&1 || packages+=(python3)
python3 -c "import ensurepip, venv" >/dev/null 2>&1 || packages+=(python3-venv python3-pip)
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || packages+=(mricron-data)
[ -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || packages+=(invesalius-examples)
if [ "${1:-}" = "--dev" ]; then
  # the web app's tests: a headless browser and its driver; VTK renders off-screen through EGL with Mesa
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
  for package in libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || packages+=("$package")
  done
fi
if [ ${#packages[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing Debian packages: ${packages[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
  else
    echo "No apt-get here: install ${packages[*]} yourself (the demo falls back to a shipped Colin27 crop)." >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision come from the registry together (timm, which LiteMedSAM's encoder uses, imports
# torchvision); see DEVELOPERS.md on why no CPU-only torch pin.
.venv/bin/python -m pip install -q -e ".${extras}"
# SAM 2.1 / MedSAM2: the sam2 package is built from source against the torch above, without its optional
# CUDA extension (a build-isolated install would fetch a second torch).
.venv/bin/python -m pip install -q "setuptools>=61" wheel
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation "sam2>=1.1"
echo "Ready: .venv/bin/segmentwithsam"
