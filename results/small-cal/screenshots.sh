#!/bin/bash
# Re-report the committed one-hour run from its archive and photograph the page at two laptop/desktop sizes in a
# headless browser (Debian's chromium). Run from the repository root:
#   bash results/small-cal/screenshots.sh
set -euo pipefail
out=results/small-cal/report
cellsearch report results/small-cal/archive --out "$out" --force --no-progress
mkdir -p "$out/screenshots"
for size in 1366x768 1920x1080; do
  # the first screen as a person sees it, then the whole page at that width
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
    --screenshot="$out/screenshots/first-screen-$size.png" "file://$PWD/$out/index.html" > /dev/null 2>&1
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size%x*},6000" \
    --screenshot="$out/screenshots/page-$size.png" "file://$PWD/$out/index.html" > /dev/null 2>&1
done
ls -la "$out/screenshots"
