#!/usr/bin/env bash
# Re-capture the banner fixtures made on a dev machine: start each Jupyter briefly and keep what it printed.
#
# Every server runs in its own network namespace that has only a loopback interface (so even
# --ip=0.0.0.0 listens on loopback only) and its own hostname, which resolves to 127.0.0.1.
# Needs root (unshare). Tokens and ports differ on every run: update EXPECTED in
# tests/unit/test_banner.py after copying a new capture over a fixture.
#
# Older versions come from throwaway venvs:
#   python3 -m venv /tmp/venv-lab3 && /tmp/venv-lab3/bin/pip install "jupyterlab==3.6.8" "jupyter_server<2" "jupyter_client<8"
#   python3 -m venv /tmp/venv-nb6  && /tmp/venv-nb6/bin/pip install "notebook==6.4.12" "jupyter_client<8" "pyzmq<25" "traitlets<5.10"
#   python3 -m venv /tmp/venv-nb7  && /tmp/venv-nb7/bin/pip install "notebook==7.2.2"
#
# Usage: tests/data/banners/capture.sh OUT_DIR [NAME...]     (no NAME: all of them)
set -euo pipefail

out=$(realpath "$1")
shift
mkdir -p "$out"
LAB4=${LAB4:-$(realpath .venv/bin/jupyter)}
LAB3=${LAB3:-/tmp/venv-lab3/bin/jupyter}
NB6=${NB6:-/tmp/venv-nb6/bin/jupyter}
NB7=${NB7:-/tmp/venv-nb7/bin/jupyter}

work=$(mktemp -d)
export JUPYTER_RUNTIME_DIR=$work/rt JUPYTER_CONFIG_DIR=$work/cfg JUPYTER_DATA_DIR=$work/data HOME=$work/home
export USER=hpcuser
mkdir -p "$HOME" "$work/nb"
common=(--no-browser --allow-root "--notebook-dir=$work/nb")

# in_ns HOST CMD...: run CMD with only loopback networking, hostname HOST, HOST resolving to 127.0.0.1.
# It execs, so call it as `in_ns ... &` or `(in_ns ...)`: $! is then the command itself, for kill.
in_ns() {
    local host=$1
    shift
    printf '127.0.0.1 localhost\n127.0.0.1 %s %s\n::1 localhost ip6-localhost\n' "$host" "${host%%.*}" \
        >"$work/hosts.$host"
    # timeout: a stop signal reaches the whole command, and nothing outlives a forgotten capture
    exec unshare -n -u -m bash -c 'ip link set lo up; hostname "$0"; mount --bind "$1" /etc/hosts; shift
        exec timeout 90 "$@"' "$host" "$work/hosts.$host" "$@"
}

# run_until FILE PATTERN HOST CMD...: append CMD's output to FILE until PATTERN shows (or 30 s), then stop it.
run_until() {
    local file=$1 pattern=$2 host=$3
    shift 3
    local before
    before=$(grep -c -- "$pattern" "$file" 2>/dev/null || true)
    in_ns "$host" "$@" >>"$file" 2>&1 &
    local pid=$!
    for _ in $(seq 1 60); do
        sleep 0.5
        [ "$(grep -c -- "$pattern" "$file" || true)" -gt "${before:-0}" ] && break
    done
    sleep 1.5
    kill "$pid" 2>/dev/null || true
    wait "$pid" || true
}

# snapshot FILE SECONDS HOST CMD...: FILE is CMD's output as it stood after SECONDS (then CMD is stopped).
snapshot() {
    local file=$1 seconds=$2 host=$3
    shift 3
    in_ns "$host" "$@" >"$work/snap" 2>&1 &
    local pid=$!
    sleep "$seconds"
    cp "$work/snap" "$file"
    kill "$pid" 2>/dev/null || true
    wait "$pid" || true
}

site_script() {  # the job scripts of four sites, in the shapes they publish
    case $1 in
    princeton) cat <<'EOF' ;;
node=$(hostname -s); user=hpcuser; cluster="tigercpu"; port=8889
echo -e "
Command to create ssh tunnel:
ssh -N -f -L ${port}:${node}:${port} ${user}@${cluster}.princeton.edu

Use a Browser on your local machine to go to:
localhost:${port}  (prefix w/ https:// if using password)
"
exec "$JUPYTER" lab "${common[@]}" --port=${port} --ip=${node}
EOF
    greene) cat <<'EOF' ;;
port=$(shuf -i 10000-65500 -n 1)
echo "To access:"
echo "ssh -L $port:localhost:$port $USER@greene.hpc.nyu.edu"
echo "ssh -L $port:localhost:$port greene"
exec "$JUPYTER" lab "${common[@]}" --port $port
EOF
    jump) cat <<'EOF' ;;
node=$(hostname -s)
echo "Jupyter is starting on ${node}. From your laptop run:"
echo "    ssh -L 8888:localhost:8888 -J login.cluster.edu ${node}"
echo "then open http://localhost:8888/ in your browser."
sleep 2
exec "$JUPYTER" lab "${common[@]}" --port 8888 --ip=127.0.0.1
EOF
    spider) cat <<'EOF' ;;
node=`hostname -s`
port=`shuf -i 8400-9400 -n 1`
if [ -z ${lport:+x} ]; then lport="8889" ; else lport=${lport}; fi
echo "Run the following on your local machine: "
echo "ssh -i /path/to/private/ssh/key -N -L ${lport}:${node}:${port} ${USER}@spider.surf.nl"
sleep 2
exec "$JUPYTER" lab "${common[@]}" --port=${port} --ip=${node}
EOF
    marker) cat <<'EOF' ;;
node=$(hostname); port=8888
"$JUPYTER" lab "${common[@]}" --ip="$node" --port=$port --ServerApp.allow_remote_access=True \
    --ServerApp.base_url=/hpclaunch/job42/ --IdentityProvider.token="$(python3 -c 'import secrets; print(secrets.token_hex(32))')" &
jpid=$!
trap 'kill $jpid; wait $jpid; exit 0' TERM
for i in $(seq 1 100); do
    python3 -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://$node:$port/hpclaunch/job42/api" 2>/dev/null && break
    sleep 0.2
done
echo "HPCLAUNCH_JUPYTER_READY host=$node port=$port base_url=/hpclaunch/job42/"
wait
EOF
    esac
}

site() {  # site NAME: a bash running that site's script, with $JUPYTER and $common set
    printf 'JUPYTER=%q; common=(%s)\n%s\n' "$LAB4" "${common[*]@Q}" "$(site_script "$1")" >"$work/$1.sh"
    echo bash "$work/$1.sh"
}

capture() {
    local name=$1 f="$out/$1.txt" at="is running at"
    rm -f "$f"
    case $name in
    lab4_default) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=127.0.0.1 --port=43417 ;;
    lab4_hostname) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --port=45221 ;;
    lab4_fqdn) run_until "$f" "$at" c123.cluster.edu "$LAB4" lab "${common[@]}" --ip=c123.cluster.edu --port=8888 ;;
    lab4_token_config) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --ServerApp.token=s3cr3t ;;
    lab4_token_env) JUPYTER_TOKEN=envtoken123 run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm ;;
    lab4_ipv6) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=::1 ;;
    lab4_base_url) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --ServerApp.base_url=/user/bob/ ;;
    lab4_no_token) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --IdentityProvider.token= ;;
    lab4_wildcard) run_until "$f" "$at" c12 "$LAB4" lab "${common[@]}" --ip=0.0.0.0 ;;
    lab4_tty) run_until "$f" "$at" vm script -q -e -c "$LAB4 lab ${common[*]} --ip=vm" /dev/null ;;
    lab4_restart_new_port)
        run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --port=35887
        run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=127.0.0.1 --port=53621 ;;
    lab4_restart_same_port_loopback)
        run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=vm --port=43135
        run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" --ip=127.0.0.1 --port=43135 ;;
    lab4_gateway) run_until "$f" "$at" node2 "$LAB4" lab "${common[@]}" --ip=127.0.0.1 --port=8888 \
        --gateway-url=http://kernel-gw.cluster.edu:8889 ;;
    lab4_log_level_warn) run_until "$f" "copy and paste" node2 "$LAB4" lab "${common[@]}" --ip=node2 --port=8888 \
        --log-level=WARN ;;
    lab4_sock) run_until "$f" "$at" vm "$LAB4" lab "${common[@]}" "--ServerApp.sock=$work/j.sock" ;;
    lab4_starting | lab4_header_only)
        capture lab4_fqdn
        if [ "$name" = lab4_starting ]; then
            awk '/is running at/{exit} {print}' "$out/lab4_fqdn.txt" >"$f"
        else
            awk '{print} /is running at/{exit}' "$out/lab4_fqdn.txt" >"$f"
        fi ;;
    server2_root) run_until "$f" "$at" vm "$LAB4" server "${common[@]}" --ip=vm ;;
    server_list) (in_ns gpu07 bash -c '"$0" lab "${@:1}" --ip=gpu07 --port=8888 >/dev/null 2>&1 & p=$!; sleep 6
        "$0" server list; kill $p; wait $p' "$LAB4" "${common[@]}") >"$f" 2>&1 || true ;;
    lab3_hostname) run_until "$f" "$at" vm "$LAB3" lab "${common[@]}" --ip=vm ;;
    lab3_token_env) JUPYTER_TOKEN=envtok run_until "$f" "$at" vm "$LAB3" lab "${common[@]}" --ip=vm ;;
    lab3_wildcard) run_until "$f" "$at" c12 "$LAB3" lab "${common[@]}" --ip=0.0.0.0 ;;
    nbclassic_ipv6) run_until "$f" "$at" vm "$LAB3" nbclassic "${common[@]}" --ip=::1 ;;
    nb6_hostname) run_until "$f" "$at" vm "$NB6" notebook "${common[@]}" --ip=vm ;;
    nb6_localhost) run_until "$f" "$at" vm "$NB6" notebook "${common[@]}" --ip=localhost ;;
    nb6_base_url) run_until "$f" "$at" vm "$NB6" notebook "${common[@]}" --ip=vm --NotebookApp.base_url=/user/alice/ ;;
    nb6_token_env) JUPYTER_TOKEN=envtok run_until "$f" "$at" vm "$NB6" notebook "${common[@]}" --ip=vm ;;
    nb6_wildcard) run_until "$f" "$at" gpu-a100-07 "$NB6" notebook "${common[@]}" --ip=0.0.0.0 ;;
    nb7_hostname) run_until "$f" "$at" vm "$NB7" notebook "${common[@]}" --ip=vm ;;
    nb7_base_url_no_token) run_until "$f" "$at" vm "$NB7" notebook "${common[@]}" --ip=vm \
        --ServerApp.base_url=/proxy/x1/ --IdentityProvider.token= ;;
    site_princeton) run_until "$f" "$at" tiger-i23c1n5.princeton.edu $(site princeton) ;;
    site_greene) run_until "$f" "$at" gr031.hpc.nyu.edu $(site greene) ;;
    site_jump) run_until "$f" "$at" node12.cluster.edu $(site jump) ;;
    site_spider) run_until "$f" "$at" wn-hb-02.spider.surf.nl $(site spider) ;;
    site_jump_early) snapshot "$f" 1 node12.cluster.edu $(site jump) ;;
    site_spider_early) snapshot "$f" 1 wn-hb-02.spider.surf.nl $(site spider) ;;
    marker_after_banner) run_until "$f" HPCLAUNCH_JUPYTER_READY node1 $(site marker) ;;
    *) echo "capture.sh: no recipe for $name (quoted from an issue, or written by hand)" >&2 ;;
    esac
}

all=(lab4_default lab4_hostname lab4_fqdn lab4_token_config lab4_token_env lab4_ipv6 lab4_base_url
    lab4_no_token lab4_wildcard lab4_tty lab4_restart_new_port lab4_restart_same_port_loopback lab4_gateway
    lab4_log_level_warn lab4_sock lab4_starting lab4_header_only server2_root server_list lab3_hostname
    lab3_token_env lab3_wildcard nbclassic_ipv6 nb6_hostname nb6_localhost nb6_base_url nb6_token_env
    nb6_wildcard nb7_hostname nb7_base_url_no_token site_princeton site_greene site_jump site_spider
    site_jump_early site_spider_early marker_after_banner)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${all[@]}")
for name in "${names[@]}"; do
    echo "capturing $name" >&2
    capture "$name"
done
rm -rf "$work"
