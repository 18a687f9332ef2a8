#!/usr/bin/env bash
# Installs the Debian packages that carry mmafm's real data (see data_cards/). Idempotent: exits
# at once when everything is installed. Needs root (CI and the dev machines run as root).
set -euo pipefail
PACKAGES=(fonts-noto-color-emoji unicode-cldr-core openclipart-png openclipart-svg
          tuxpaint-stamps-default dataset-fashion-mnist wordnet-base fortunes jargon-text)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "make data: installing Debian data packages: ${missing[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
