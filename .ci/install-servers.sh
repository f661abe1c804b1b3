#!/usr/bin/env bash
# Install the real collectors the integration tests start themselves:
# Prometheus and VictoriaMetrics (which also ships vmagent), from Debian.
#
# Idempotent: does nothing when the binaries are already there. The tests
# start their own instances on free 127.0.0.1 ports with temporary data
# directories (tests/servers.py); the packages' own daemons are never used
# and are never left running.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v victoria-metrics >/dev/null 2>&1 || need+=(victoria-metrics)

if [ "${#need[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-servers: need root to install: ${need[*]}" >&2
        exit 1
    fi
    # Keep the postinst scripts from starting the default daemons
    # (invoke-rc.d honours policy-rc.d; exit 101 = "action forbidden").
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    cleanup() { if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup EXIT

    echo "install-servers: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Never rely on (or keep) the packages' default services on :9090 / :8428.
for svc in prometheus victoria-metrics; do
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
    # The sysvinit scripts stop only their own pidfile's process, --oknodo.
    if [ -x "/etc/init.d/$svc" ]; then
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done

for bin in prometheus victoria-metrics; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "install-servers: $bin still missing after install" >&2
        exit 1
    fi
done
echo "install-servers: prometheus $(prometheus --version 2>&1 | head -n1 | awk '{print $3}')," \
     "victoria-metrics $(dpkg-query -W -f='${Version}' victoria-metrics 2>/dev/null || echo '?')"
