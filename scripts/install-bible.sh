#!/usr/bin/env bash
# The SWORD Bible modules (KJV, World English Bible, Reina-Valera 1909) and their reader
# diatheke: the offline English-Spanish and English-English parallel corpus
# (lmforge.data.bible). Debian/Ubuntu only; safe to run again. Needs root (or sudo).
set -euo pipefail
if command -v diatheke >/dev/null && { diatheke -b system -k modulelist 2>/dev/null || true; } | grep -q "RV1909"; then
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" diatheke sword-text-kjv sword-text-web sword-text-sparv
diatheke -b system -k modulelist | sed -n '/Biblical Texts/,/Commentaries/p'
