#!/usr/bin/env bash
# Fashion-MNIST (70k 28x28 grey images, 10 named classes) from Debian's
# dataset-fashion-mnist: the offline image data of lmforge.vlm. Debian/Ubuntu only;
# safe to run again. Needs root (or sudo).
set -euo pipefail
if [ -d /usr/share/datasets/fashion-mnist ] && ls /usr/share/datasets/fashion-mnist | grep -q "t10k"; then
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" dataset-fashion-mnist
ls /usr/share/datasets/fashion-mnist
