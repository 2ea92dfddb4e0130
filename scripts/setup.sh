#!/usr/bin/env bash
# Set up SegmentWithSAM on a Debian machine: system packages (Python venv support, the Colin27 MRI and the
# InVesalius head CT), then a virtual environment in .venv with the core and the `segmentwithsam` command.
#   bash scripts/setup.sh          # the light path: LiteMedSAM on the CPU (OpenVINO, no PyTorch), for the demo
#   bash scripts/setup.sh --torch  # also PyTorch (CUDA/MPS, SAM, MedSAM, other checkpoints) and sam2 (SAM 2.1,
#                                  # MedSAM2)
#   bash scripts/setup.sh --dev    # --torch and the test tools (pytest, hypothesis, ruff, slicer-core) and the web
#                                  # app with what its browser tests need (Chromium, chromedriver, Mesa's EGL)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  --torch) extras="[torch]" ;;
  --dev) extras="[test,web]" ;;  # the test extra brings the torch extra (the tests compare against PyTorch)
esac

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
# torchvision); pyproject.toml's torch extra says why there is no CPU-only torch pin.
.venv/bin/python -m pip install -q -e ".${extras}"
if [ -n "$extras" ]; then
  # SAM 2.1 / MedSAM2: sam2's own requirements (the [sam2] group of the Slicer module's requirements.txt, the
  # one list of them), then sam2 built from source against the torch above, without its dependencies and its
  # optional CUDA extension: a build-isolated install would fetch a second torch, its pins could replace this one.
  group=$(sed -n '/^# \[sam2\]/,$p' SegmentWithSAM/Resources/requirements.txt | grep -v '^#')
  # shellcheck disable=SC2046  # one requirement per word
  .venv/bin/python -m pip install -q "setuptools>=61" wheel $(grep -v '^sam2' <<<"$group")
  # shellcheck disable=SC2046
  SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation --no-deps $(grep '^sam2' <<<"$group")
fi
echo "Ready: .venv/bin/segmentwithsam"
