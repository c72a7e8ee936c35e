#!/usr/bin/env bash
# Runs deploy/systemd/eplb-sidecar.service under a real systemd: boots a minimal Debian root in a
# systemd-nspawn container, follows deploy/README.md's "systemd, step by step" in it, and runs a
# leader (node 0 of 2) and a follower (node 1) as two copies of the unit linked over CURVE on
# 127.0.0.1, with four demo engine ranks (user engine, group eplb) as transient services. Checks:
# start (Type=notify: active only after READY=1), /healthz, /readyz, a committed rebalance, only
# JSON lines in the journal, the watchdog (the same processes after WatchdogSec), restart (the
# leader keeps its decision log and commits a new epoch), stop (ExecMainStatus=0, Result=success),
# start after a stop. Prints "ok: ..." per check and "PASS" at the end; on a failure the units'
# journals, and exits non-zero (2: could not set up). Needs root, debootstrap and systemd-nspawn
# (systemd-container); on a Debian/Ubuntu machine it installs those itself.
#
#   deploy/systemd/test-in-container.sh            # PYTHON=python3 builds the wheels
#
# Never boots systemd on this machine's own root: the container's root is its own directory under
# $EPLB_SYSTEMD_CACHE (/var/tmp/eplb-systemd, not /tmp, whose boot-time cleanup the container's
# systemd-tmpfiles would otherwise be pointed at), and every systemctl runs inside the container
# (nsenter into its namespaces). The Debian root with a venv of the sidecar's dependencies
# (torch's CPU wheel, as the host's pip resolves it) is built once per content hash and reused;
# each run boots an overlay of it that is thrown away.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Inside the container: deploy/README.md's steps, as a user would type them, then the checks.
# Runs as `test-in-container.sh --inside LEADER_PORT HTTP0 HTTP1 GLOO_PORT` with /root/eplb holding the
# repository's deploy/ and the wheel, /wheels the dependencies' wheels (there is no internet).
inside() {
    local port=$1 http0=$2 http1=$3 gloo=$4
    local leader=eplb-sidecar follower=eplb-sidecar-follower
    local venv=/opt/eplb/venv ctl="/opt/eplb/venv/bin/eplbctl --run-dir /run/eplb"
    cd /root/eplb
    ok() { echo "ok: $*"; }
    fail() {
        trap - ERR
        echo "FAIL: $*"
        for u in $leader $follower; do
            echo "----- systemctl status $u"; systemctl status --no-pager -l $u || true
            echo "----- journalctl -u $u"; journalctl -u $u --no-pager -n 150 || true
        done
        echo "----- journalctl -u 'eplb-engine-*'"
        journalctl -u 'eplb-engine-*' --no-pager -n 60 || true
        exit 1
    }
    trap 'fail "line $LINENO: $BASH_COMMAND"' ERR
    http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$1" || true; }
    wait_code() {  # URL CODE SECONDS
        local deadline=$((SECONDS + $3))
        until [ "$(http_code "$1")" = "$2" ]; do
            [ $SECONDS -lt $deadline ] || fail "$1 did not answer $2 within $3 s: $(curl -s "$1")"
            sleep 0.5
        done
    }
    prop() { systemctl show -P "$2" "$1"; }
    status() {  # a python expression over the leader's status s
        $ctl status --json | $venv/bin/python -c "import json, sys; s = json.load(sys.stdin); print($1)"
    }
    sidecar_lines() { journalctl -u "$1" SYSLOG_IDENTIFIER=eplb-sidecar --no-pager -o cat; }

    # 1. A user and a virtual environment (the venv with torch's CPU wheel and numpy is in the
    #    cached root: `python3 -m venv /opt/eplb/venv` and pip from /wheels, there is no index).
    useradd --system --user-group --no-create-home --shell /usr/sbin/nologin eplb
    $venv/bin/pip install -q --no-index --find-links /wheels /root/eplb/eplb_coordinator-*.whl
    ok "step 1: user eplb, $($venv/bin/pip list 2>/dev/null | grep -E '^(eplb-coordinator|torch|numpy) ' | tr -s ' ' | paste -sd, -)"

    # 2. Settings, edited as the README says: num-nodes (2), leader, expected-workers (2 ranks per
    #    node here); since both nodes share this machine and its network, loopback addresses.
    mkdir -p /etc/eplb
    cp deploy/systemd/sidecar.toml /etc/eplb/sidecar.toml
    cp deploy/systemd/sidecar.env /etc/eplb/sidecar.env
    sed -i -e "s|^leader = .*|leader = \"tcp://127.0.0.1:$port\"|" \
           -e "s|^bind = .*|bind = \"tcp://127.0.0.1:$port\"|" \
           -e "s|^http = .*|http = \"127.0.0.1:$http0\"|" \
           -e "s|^expected-workers = .*|expected-workers = 2|" \
           -e "s|^interval = .*|interval = 100000000|" /etc/eplb/sidecar.toml
    # (interval: epochs start only when this script forces one, so that the restarts below find
    # no epoch in flight; a sidecar restarted mid-epoch is the fault trials' subject, and with
    # epochs every 1,000 steps here a restart once met one and the engine's copies timed out)
    (set -a; . /etc/eplb/sidecar.env; EPLB_CONFIG=/etc/eplb/sidecar.toml \
        $venv/bin/eplb-sidecar --print-config) > /root/print-config.toml 2>/root/print-config.err
    grep -q "^node-rank = 0" /root/print-config.toml || fail "print-config: $(cat /root/print-config.*)"
    [ ! -s /root/print-config.err ] || fail "print-config wrote to stderr: $(cat /root/print-config.err)"
    ok "step 2: /etc/eplb/sidecar.toml and sidecar.env, --print-config"

    # 3. CURVE keys: the leader's files in /etc/eplb/curve; node 1's in /etc/eplb/curve-follower
    #    (on a real second machine that would be its /etc/eplb/curve).
    $venv/bin/eplbctl keys /root/eplb-keys --nodes 2 >/dev/null
    install -d -o root -g eplb -m 0750 /etc/eplb/curve /etc/eplb/curve-follower
    install -o root -g eplb -m 0640 /root/eplb-keys/leader.key_secret /root/eplb-keys/node-1.key \
        /etc/eplb/curve/
    install -o root -g eplb -m 0640 /root/eplb-keys/leader.key /root/eplb-keys/node-1.key_secret \
        /etc/eplb/curve-follower/
    ok "step 3: eplbctl keys, /etc/eplb/curve"

    # 4. The unit, and the engine's user in group eplb. The follower is a copy of the unit with
    #    its own run directory, settings and keys (a drop-in).
    useradd --user-group --create-home engine
    cp deploy/systemd/eplb-sidecar.service /etc/systemd/system/
    usermod -aG eplb engine
    cp deploy/systemd/eplb-sidecar.service /etc/systemd/system/$follower.service
    mkdir -p /etc/systemd/system/$follower.service.d
    printf '[Service]\nRuntimeDirectory=\nRuntimeDirectory=eplb-follower\nEnvironmentFile=\nEnvironmentFile=/etc/eplb/follower.env\n' \
        > /etc/systemd/system/$follower.service.d/node-1.conf
    printf 'EPLB_NODE_RANK=1\nEPLB_RUN_DIR=/run/eplb-follower\nEPLB_HTTP=127.0.0.1:%s\nEPLB_CURVE_KEYS=/etc/eplb/curve-follower\n' \
        "$http1" > /etc/eplb/follower.env
    systemctl daemon-reload
    local out; out=$(systemd-analyze verify --man=no /etc/systemd/system/$leader.service \
        /etc/systemd/system/$follower.service 2>&1) || fail "systemd-analyze verify: $out"
    [ -z "$out" ] || fail "systemd-analyze verify: $out"
    ok "systemd-analyze verify of the installed units: no output"
    local t0=$SECONDS
    timeout 120 systemctl enable --now $leader || fail "systemctl enable --now $leader"
    ok "step 4: $leader started (READY=1) in $((SECONDS - t0)) s"
    t0=$SECONDS
    timeout 120 systemctl start $follower || fail "systemctl start $follower"
    ok "$follower started in $((SECONDS - t0)) s"

    # 5. Check it.
    for u in $leader $follower; do
        [ "$(systemctl is-active $u)" = active ] || fail "$u is $(systemctl is-active $u)"
    done
    systemctl status --no-pager $leader | grep -q "active (running)" || fail "status of $leader"
    ok "both active (running)"
    wait_code "http://127.0.0.1:$http0/healthz" 200 10
    wait_code "http://127.0.0.1:$http1/healthz" 200 10
    ok "/healthz 200 on both"
    [ "$(http_code "http://127.0.0.1:$http0/readyz")" = 503 ] || fail "leader ready without workers"
    ok "/readyz 503 before the engine's ranks joined"
    $ctl status >/root/status.txt || fail "eplbctl status: $(cat /root/status.txt)"
    runuser -u engine -- env EPLB_GROUP_ACCESS=true $ctl status >/root/status.txt 2>&1 \
        || fail "eplbctl status as user engine: $(cat /root/status.txt)"
    ok "eplbctl --run-dir /run/eplb status, as root and as user engine (group eplb)"
    [ "$(stat -c '%a %G' /run/eplb)" = "770 eplb" ] || fail "/run/eplb is $(stat -c '%a %G' /run/eplb)"
    ok "/run/eplb is 0770 group eplb"

    # The engine: 4 demo ranks (2 per node) as user engine, as systemd services (User= also gives
    # them group eplb), with EPLB_GROUP_ACCESS=true as step 4 says.
    for r in 0 1 2 3; do
        local dir=/run/eplb; [ $r -lt 2 ] || dir=/run/eplb-follower
        systemd-run -q --unit=eplb-engine-$r --uid=engine -p WorkingDirectory=/home/engine \
            -E EPLB_GROUP_ACCESS=true $venv/bin/python -m eplb.demo.worker --rank $r --world-size 4 \
            --ranks-per-node 2 --run-dir $dir --dist-init tcp://127.0.0.1:$gloo --steps 0 \
            --step-ms 1 --result /home/engine/worker$r.json
    done
    wait_code "http://127.0.0.1:$http0/readyz" 200 60
    wait_code "http://127.0.0.1:$http1/readyz" 200 20
    ok "/readyz 200 on both once the engine's ranks joined (the follower heard the leader over CURVE)"
    local deadline=$((SECONDS + 10))
    until curl -s "http://127.0.0.1:$http0/metrics" | grep -q '^eplb_follower_sidecars 1'; do
        [ $SECONDS -lt $deadline ] \
            || fail "leader: $(curl -s "http://127.0.0.1:$http0/metrics" | grep '^eplb_follower_sidecars')"
        sleep 0.5
    done
    ok "leader: eplb_follower_sidecars 1, workers $(status 's["workers"]')"

    # A rebalance, planned in the process planner (sidecar.toml) under the unit's hardening.
    deadline=$((SECONDS + 90))
    until [ "$(status 'sum(e["outcome"] == "committed" for e in s["history"])')" -gt 0 ]; do
        [ $SECONDS -lt $deadline ] || fail "no epoch committed in 90 s: $(status 's["history"]')"
        if [ "$(status 's["epoch_in_flight"] is None')" = True ]; then
            $ctl rebalance --force >/dev/null
        fi
        sleep 1
    done
    ok "a rebalance committed: $(status '[e["outcome"] for e in s["history"]]')"
    local last_epoch; last_epoch=$(status 'max(e["epoch"] or 0 for e in s["history"])')

    # Every line the sidecars wrote is JSON, none a warning or an error.
    for u in $leader $follower; do
        deadline=$((SECONDS + 10))
        until sidecar_lines $u | grep -q 'sidecar stopped\|up; workers on'; do
            [ $SECONDS -lt $deadline ] || fail "$u: its start is not in the journal"
            sleep 0.5
        done
        if sidecar_lines $u | grep -v '^{'; then fail "$u: lines that are not JSON (above)"; fi
        if sidecar_lines $u | grep -E '"level": ?"(WARNING|ERROR|CRITICAL)"'; then
            fail "$u: warnings or errors in the journal (above)"
        fi
    done
    ok "journals: JSON lines only, no warnings or errors"

    # The watchdog (WatchdogSec=10): still the same processes, never restarted, after 12 s.
    local pid0 pid1
    pid0=$(prop $leader MainPID) pid1=$(prop $follower MainPID)
    sleep 12
    for u in $leader $follower; do
        [ "$(systemctl is-active $u)" = active ] && [ "$(prop $u NRestarts)" = 0 ] \
            || fail "$u: $(systemctl is-active $u), NRestarts=$(prop $u NRestarts)"
    done
    [ "$(prop $leader MainPID)" = "$pid0" ] && [ "$(prop $follower MainPID)" = "$pid1" ] \
        || fail "a main PID changed without a restart"
    ok "watchdog: both still running 12 s later, NRestarts=0"

    # Restart: a new process, ready again; the engine's ranks join the new one.
    for u in $leader $follower; do
        local before; before=$(prop $u MainPID)
        timeout 60 systemctl restart $u || fail "systemctl restart $u"
        [ "$(systemctl is-active $u)" = active ] && [ "$(prop $u MainPID)" != "$before" ] \
            || fail "$u after restart: $(systemctl is-active $u), MainPID $(prop $u MainPID)"
    done
    wait_code "http://127.0.0.1:$http0/healthz" 200 10
    wait_code "http://127.0.0.1:$http0/readyz" 200 30
    wait_code "http://127.0.0.1:$http1/readyz" 200 30
    ok "restart: new main processes; /healthz, /readyz 200 again, workers $(status 's["workers"]')"

    # The restarted leader kept its decision log (/run/eplb/decisions.jsonl): its next epoch is
    # a new number, and it commits.
    sidecar_lines $leader | grep "restored [1-9][0-9]* decision" >/dev/null \
        || fail "the restarted leader restored no decisions: $(sidecar_lines $leader | grep restored)"
    deadline=$((SECONDS + 90))
    until [ "$(status 'sum(e["outcome"] == "committed" and (e["epoch"] or 0) > '"$last_epoch"' for e in s["history"])')" -gt 0 ]; do
        [ $SECONDS -lt $deadline ] || fail "no epoch after $last_epoch committed in 90 s: $(status 's["history"]')"
        if [ "$(status 's["epoch_in_flight"] is None')" = True ]; then
            $ctl rebalance --force >/dev/null
        fi
        sleep 1
    done
    [ "$(status 'not s["unsafe"]')" = True ] || fail "the leader says unsafe: $(status 's["unsafe"]')"
    ok "after the restart: epoch $(status 'max(e["epoch"] or 0 for e in s["history"])') > $last_epoch committed"

    # Stop: SIGTERM, clean exit 0 well within TimeoutStopSec.
    systemctl stop 'eplb-engine-*'
    for u in $follower $leader; do
        t0=$SECONDS
        timeout 60 systemctl stop $u || fail "systemctl stop $u"
        local st res
        st=$(prop $u ExecMainStatus) res=$(prop $u Result)
        [ "$st" = 0 ] && [ "$res" = success ] || fail "$u stopped with ExecMainStatus=$st Result=$res"
        ok "stop $u in $((SECONDS - t0)) s: ExecMainStatus=0 Result=success"
    done
    # Start after a stop: the kept run directory (sockets left behind, the decision log) is fine.
    [ -f /run/eplb/decisions.jsonl ] || fail "/run/eplb/decisions.jsonl is gone after the stop"
    timeout 120 systemctl start $leader || fail "systemctl start $leader after a stop"
    wait_code "http://127.0.0.1:$http0/healthz" 200 10
    timeout 60 systemctl stop $leader
    [ "$(prop $leader ExecMainStatus) $(prop $leader Result)" = "0 success" ] \
        || fail "$leader: ExecMainStatus=$(prop $leader ExecMainStatus) Result=$(prop $leader Result)"
    ok "start after the stop, and stop again: ExecMainStatus=0 Result=success"
    # (Restarting a node logs errors on the other: "node 1 lost"; a crash would leave these.)
    for u in $leader $follower; do
        if sidecar_lines $u | grep -E '"level": ?"CRITICAL"|Traceback'; then
            fail "$u: a traceback or a critical error in the journal (above)"
        fi
    done
    ok "journals: no traceback over restart and stop"
    systemd-analyze security --no-pager $leader 2>/dev/null | tail -1 | sed 's/^/info: /' || true
    echo PASS
}

if [ "${1:-}" = --inside ]; then
    shift
    inside "$@"
    exit
fi

# ---------------------------------------------------------------------------------------------
# On the host.
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
CACHE=${EPLB_SYSTEMD_CACHE:-/var/tmp/eplb-systemd}
MIRROR=${EPLB_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# torch as requirements-dev.txt pins it; the host's pip picks the wheel (a CPU build here).
TORCH=${EPLB_TORCH:-$(grep -E '^torch==' "$REPO/requirements-dev.txt")}
PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,curl,ca-certificates
say() { echo "== $*" >&2; }
die() { echo "test-in-container.sh: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, systemd-nspawn, mount)"
case "$CACHE" in /tmp|/tmp/*) die "EPLB_SYSTEMD_CACHE must not be under /tmp" ;; esac
if ! command -v debootstrap >/dev/null || ! command -v systemd-nspawn >/dev/null \
        || ! command -v nsenter >/dev/null; then
    command -v apt-get >/dev/null || die "install debootstrap and systemd-nspawn (systemd-container)"
    say "installing debootstrap and systemd-container"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends debootstrap systemd-container util-linux; } >&2 \
        || die "apt-get install debootstrap systemd-container failed"
fi
if [ -z "${EPLB_DEBIAN_SUITE:-}" ]; then
    # shellcheck disable=SC1091
    EPLB_DEBIAN_SUITE=$(. /etc/os-release; [ "${ID:-}" = debian ] && echo "${VERSION_CODENAME:-}")
fi
SUITE=${EPLB_DEBIAN_SUITE:-bookworm}

mkdir -p "$CACHE"
RUN=$(mktemp -d "$CACHE/run.XXXXXX")
NSPAWN_PID="" init=""
cleanup() {
    local rc=$?
    if [ -n "$NSPAWN_PID" ] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
        say "powering the container off"
        kill -TERM "$NSPAWN_PID" 2>/dev/null || true   # nspawn: SIGRTMIN+3 to the container's init
        for _ in $(seq 60); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$NSPAWN_PID" 2>/dev/null; then
            # (an init that has not yet set up its signal handlers ignores nspawn's SIGRTMIN+3)
            say "no poweroff within 30 s: killing the container's init and systemd-nspawn"
            [ -z "$init" ] || kill -KILL "$init" 2>/dev/null || true
            kill -KILL "$NSPAWN_PID" 2>/dev/null || true
            for _ in $(seq 20); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.5; done
        fi
    fi
    rm -rf "/run/systemd/nspawn/propagate/eplb-test-$$"  # nspawn leaves it where /run is no tmpfs
    if mountpoint -q "$RUN/root"; then umount "$RUN/root" || umount -l "$RUN/root"; fi
    [ $rc = 0 ] || [ -z "${KEEP:-}" ] || { say "kept $RUN"; return; }
    rm -rf --one-file-system "$RUN"
}
trap cleanup EXIT
trap 'say "failed: line $LINENO: $BASH_COMMAND"' ERR
trap 'exit 130' INT TERM

# The project's wheel, built from a copy of the working tree (a stale build/ would leak into it).
t0=$SECONDS
mkdir -p "$RUN/src" "$RUN/eplb"
git -C "$REPO" ls-files -co --exclude-standard -z | (cd "$REPO" && xargs -0 cp --parents -t "$RUN/src" 2>/dev/null || true)
"$PYTHON" -m pip wheel -q --no-deps -w "$RUN/eplb" "$RUN/src" > "$RUN/wheel.log" 2>&1 \
    || { cat "$RUN/wheel.log" >&2; die "pip wheel failed"; }
cp -r "$RUN/src/deploy" "$RUN/eplb/deploy"
cp "$0" "$RUN/eplb/test-in-container.sh"

# The cached root: debootstrap, plus /opt/eplb/venv with the dependencies (README step 1).
deps=$(sed -n '/^dependencies = \[/,/^]/p' "$RUN/src/pyproject.toml")
key=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "$TORCH" "$deps" "$(uname -m)" \
      "$(sed -n '/^ *# root recipe/,/^ *# end of root recipe/p' "$0")" | sha256sum | cut -c1-16)
BASE=$CACHE/root-$SUITE-$key
WHEELS=$CACHE/wheels-$key
exec 9>"$CACHE/build.lock"
flock 9
if [ ! -d "$BASE" ]; then
    # root recipe
    say "building $BASE (debootstrap $SUITE, first run only)"
    # (an interrupted debootstrap may have left /proc or /dev mounted in it)
    grep -F " $BASE.tmp/" /proc/mounts | cut -d' ' -f2 | sort -r | xargs -r umount -l || true
    rm -rf --one-file-system "$BASE.tmp" "$WHEELS.tmp"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE.tmp" "$MIRROR" \
        > "$RUN/debootstrap.log" 2>&1 || { tail -20 "$RUN/debootstrap.log" >&2; die "debootstrap failed"; }
    pyver=$(readlink "$BASE.tmp/usr/bin/python3" | sed 's/^python//')
    "$PYTHON" -m pip download -q -d "$WHEELS.tmp" --only-binary=:all: --python-version "$pyver" \
        "$RUN"/eplb/eplb_coordinator-*.whl "$TORCH" numpy 2>&1 | grep -v "is ignored: it is neither" >&2 || true
    rm -f "$WHEELS".tmp/eplb_coordinator-*.whl
    ls "$WHEELS".tmp/torch-*.whl >/dev/null || die "pip download found no torch wheel"
    if ls "$WHEELS".tmp | grep -q '^nvidia_'; then die "pip picked a CUDA build of torch; set EPLB_TORCH"; fi
    mv "$WHEELS.tmp" "$WHEELS"
    # README step 1, but from the downloaded wheels: no index inside, and no systemd booted.
    systemd-nspawn -q --register=no --keep-unit --machine="eplb-build-$$" -D "$BASE.tmp" --bind-ro="$WHEELS:/wheels" \
        sh -c 'python3 -m venv /opt/eplb/venv &&
               /opt/eplb/venv/bin/pip install -q --no-index --find-links /wheels /wheels/*.whl' >&2 \
        || die "the venv in the root failed"
    rm -rf "/run/systemd/nspawn/propagate/eplb-build-$$"  # nspawn leaves it where /run is no tmpfs
    mv "$BASE.tmp" "$BASE"
    # end of root recipe
    for old in "$CACHE"/root-* "$CACHE"/wheels-*; do  # older recipes' roots, unless in use
        case "$old" in "$BASE"|"$WHEELS") continue ;; esac
        grep -qF -- "-${old##*-}" /proc/mounts || rm -rf --one-file-system "$old"
    done
fi
flock -u 9
say "root ready in $((SECONDS - t0)) s: $BASE"

# Boot an overlay of it (thrown away at the end), sharing the host's network: loopback ports.
mkdir -p "$RUN/upper" "$RUN/work" "$RUN/root"
mount -t overlay overlay -o "lowerdir=$BASE,upperdir=$RUN/upper,workdir=$RUN/work" "$RUN/root"
cp -r "$RUN/eplb" "$RUN/root/root/eplb"
read -r port http0 http1 gloo < <("$PYTHON" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
t1=$SECONDS
systemd-nspawn --boot --register=no --keep-unit --machine="eplb-test-$$" -D "$RUN/root" \
    --bind-ro="$WHEELS:/wheels" --console=read-only > "$RUN/console.log" 2>&1 &
NSPAWN_PID=$!
init=""
for _ in $(seq 100); do
    for c in $(pgrep -P "$NSPAWN_PID" || true); do
        [ "$(cat /proc/"$c"/comm 2>/dev/null)" = systemd ] && init=$c
    done
    [ -n "$init" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || { cat "$RUN/console.log" >&2; die "systemd-nspawn exited"; }
    sleep 0.2
done
[ -n "$init" ] || { cat "$RUN/console.log" >&2; die "no systemd in the container after 20 s"; }
in_container() {
    nsenter --target "$init" --mount --uts --ipc --pid --root --wd -- \
        env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= "$@"
}
deadline=$((SECONDS + 90))  # (early on systemctl says nothing or "offline")
until state=$(in_container timeout 60 systemctl is-system-running --wait 2>/dev/null)
      [ -n "$state" ] && [ "$state" != offline ]; do
    [ $SECONDS -lt $deadline ] || break
    sleep 0.5
done
case "$state" in
    running) ;;
    degraded) say "container degraded: $(in_container systemctl --failed --no-legend --plain | tr '\n' ';')" ;;
    *) cat "$RUN/console.log" >&2; die "the container did not boot: '$state'" ;;
esac
say "container booted in $((SECONDS - t1)) s ($state)"
in_container timeout 600 bash /root/eplb/test-in-container.sh --inside "$port" "$http0" "$http1" "$gloo"
say "total $((SECONDS - t0)) s"
