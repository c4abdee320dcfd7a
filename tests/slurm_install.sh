#!/usr/bin/env bash
# Install a Slurm controller, node daemon and munge for tests/test_slurm.py.
# Idempotent: does nothing when they are already installed. Debian/Ubuntu only.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in sbin

have_all() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v sbatch >/dev/null && command -v munged >/dev/null
}

if have_all; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "slurm_install.sh: apt-get not found; install slurm-wlm and munge by hand" >&2
    exit 1
fi

apt_get() {
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else
        sudo env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    fi
}
install() {
    apt_get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}
# The package lists may be missing or stale (fresh CI images): refresh only then.
if ! install 2>/dev/null; then
    apt_get update -qq >/dev/null
    install
fi
have_all || { echo "slurm_install.sh: install finished but slurm commands are missing" >&2; exit 1; }
echo "slurm_install.sh: installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) and munge"
