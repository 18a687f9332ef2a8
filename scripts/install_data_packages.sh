#!/usr/bin/env bash
# Install the Debian packages the real data sources read (see data_cards/). Idempotent: exits at
# once when every package is already installed. Called by `make data` and `make test`.
#   bash scripts/install_data_packages.sh
set -euo pipefail

PACKAGES=(
  fonts-noto-color-emoji   # emoji images (NotoColorEmoji.ttf)
  unicode-cldr-core        # emoji names: CLDR annotations/en.xml
  openclipart-png          # clip-art images
  openclipart-svg          # clip-art titles and keywords
  tuxpaint-stamps-default  # Tux Paint stamps + descriptions
  dataset-fashion-mnist    # held-out zero-shot classification set
  wordnet-base             # WordNet glosses (text)
  fortunes                 # fortune cookies (text)
  fortunes-min
  jargon-text              # the Jargon File (text)
)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg -s "$package" >/dev/null 2>&1; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "data packages: all ${#PACKAGES[@]} installed"
  exit 0
fi

echo "data packages: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
