#!/usr/bin/env bash
# Install Debian's chromium for the slide reward (glm5_ref/apps/slides.py) if /usr/bin/chromium is missing.
# Idempotent and quiet. It never fails the build: without root (or passwordless sudo), without apt-get, or
# when the install itself fails, it says so and exits 0; the browser tests then skip with that reason.
set -u

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: no apt-get here; install chromium yourself (the slide-reward browser tests will skip)"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    echo "setup_browser: not root; run 'apt-get install chromium' as root (the slide-reward browser tests will skip)"
    exit 0
fi

log=$(mktemp)
start=$(date +%s)
echo "setup_browser: installing Debian's chromium (apt-get, about 15 s with a fast mirror) ..."
if $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=120 update >"$log" 2>&1 &&
   $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=120 install -y \
       --no-install-recommends chromium >>"$log" 2>&1 && [ -x /usr/bin/chromium ]; then
    echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null) installed in $(( $(date +%s) - start )) s"
else
    echo "setup_browser: could not install chromium (the slide-reward browser tests will skip); apt said:"
    tail -n 5 "$log"
fi
rm -f "$log"
exit 0
