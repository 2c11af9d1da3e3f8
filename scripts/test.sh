#!/usr/bin/env bash
# Install what the tests need, system packages included, and run them: the README's test
# command, and exactly what CI runs (.ci/run).
#
#   bash scripts/test.sh [LEG...] [-- PYTEST-ARGS...]
#
# Legs (default: all three):
#   main    Python 3 from PATH (python3), the newest releases of every dependency, the whole suite
#           in .venv (kept afterwards, for running pytest by hand)
#   oldest  Python 3.10 with the oldest releases pyproject.toml allows of every runtime
#           dependency (cloudpickle, tblib, paramiko), the suite without the slow tests (the SSH
#           tests stay: they are what the paramiko floor is about)
#   py313   Python 3.13 with the newest releases, the same subset
# Interpreters for the other legs: python3.10 / python3.13 on PATH, or pyenv's versions; set
# DISTEXEC_PY310 / DISTEXEC_PY313 to name one. A missing one skips its leg with a warning, except
# under CI=true, where it fails the run.
#
# System packages (Debian/Ubuntu, needs root or sudo): openssh-server and openssh-client for the
# SSH tests (real sshd "hosts" in network namespaces), nftables and iproute2 for their network
# faults. Without root or sudo this only warns: the SSH tests then skip, or fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

LEGS=()
PYTEST_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; PYTEST_ARGS=("$@"); break ;;
        main|oldest|py313) LEGS+=("$1"); shift ;;
        *) echo "unknown leg '$1' (main, oldest, py313; pytest arguments after --)" >&2; exit 2 ;;
    esac
done
[ ${#LEGS[@]} -gt 0 ] || LEGS=(main oldest py313)

# Tests left out of the extra legs: those marked slow (CPython's own concurrent.futures tests run
# against DistributedExecutor; they exercise the executor's semantics, which do not depend on the
# releases of our dependencies, and they take minutes). They run in main.
SUBSET=(-m "not slow")

SYSTEM_PACKAGES="openssh-server openssh-client nftables iproute2"

install_system_packages() {
    local missing=""
    command -v /usr/sbin/sshd >/dev/null || missing="yes"
    command -v ssh >/dev/null || missing="yes"
    command -v nft >/dev/null || missing="yes"
    command -v ip >/dev/null || missing="yes"
    [ -n "$missing" ] || { echo "== system packages: present"; return 0; }
    local sudo
    if [ "$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" = none ] || ! command -v apt-get >/dev/null; then
        echo "== WARNING: cannot install $SYSTEM_PACKAGES (needs apt-get and root or sudo);" \
             "the SSH tests will skip (or fail under CI=true)" >&2
        return 0
    fi
    echo "== apt-get install $SYSTEM_PACKAGES"
    # DPkg::Lock::Timeout waits for an apt that another process (one started at boot) holds; a
    # failed update falls back to the package lists already on the machine.
    $sudo apt-get -o DPkg::Lock::Timeout=120 update -qq || true
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 install -y -qq \
        --no-install-recommends $SYSTEM_PACKAGES
}

find_python() {  # find_python 3.10 VAR -> the path of a working interpreter, or nothing
    # pyenv's versions directory first: its shims on PATH exist for every version but run only
    # the ones that `pyenv global` selects. Each candidate must really run and be that version.
    local version="$1" override="$2" candidate
    if [ -n "${!override:-}" ]; then echo "${!override}"; return; fi
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$version".*/bin/python \
                     "$(command -v "python$version" || true)"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (${version/./, }))" \
                >/dev/null 2>&1; then
            echo "$candidate"; return
        fi
    done
}

oldest_constraints() {  # the floors of the runtime dependencies, as == pins
    python3 - <<'PY'
import re
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
for name, floor in re.findall(r'"([A-Za-z0-9_.-]+)>=([^",; ]+)', block):
    print(f"{name}=={floor}")
PY
}

run_leg() {  # run_leg NAME PYTHON VENV CONSTRAINTS PYTEST-ARGS...
    local name="$1" python="$2" venv="$3" constraints="$4"; shift 4
    echo "== leg $name: $python ($("$python" --version 2>&1)), venv $venv"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    local pip=("$venv/bin/pip" install -q --disable-pip-version-check)
    if [ -n "$constraints" ]; then
        oldest_constraints > "$venv/oldest.txt"
        echo "   pinned: $(tr '\n' ' ' < "$venv/oldest.txt")"
        pip+=(-c "$venv/oldest.txt")
    fi
    "${pip[@]}" -e '.[test,docs]'
    # Byte-compile the package, as pip does for a normal install: with PYTHONDONTWRITEBYTECODE=1
    # (set on these machines) an editable install is otherwise compiled again by every worker
    # process at its start. A module edited later is simply compiled in memory again.
    "$venv/bin/python" -m compileall -q distexec
    "$venv/bin/python" - <<'PY'
from importlib.metadata import version
print("   installed:", ", ".join(f"{n} {version(n)}" for n in ("cloudpickle", "tblib", "paramiko")))
PY
    "$venv/bin/python" -m pytest "$@"
}

install_system_packages
failed=()
for leg in "${LEGS[@]}"; do
    case "$leg" in
        main) run_leg main python3 .venv "" "${PYTEST_ARGS[@]}" || failed+=(main) ;;
        oldest|py313)
            if [ "$leg" = oldest ]; then version=3.10; var=DISTEXEC_PY310; pins=yes
            else version=3.13; var=DISTEXEC_PY313; pins=""; fi
            python=$(find_python "$version" "$var")
            if [ -z "$python" ]; then
                echo "== leg $leg: no Python $version found (set $var)" >&2
                if [ "${CI:-}" = true ]; then failed+=("$leg"); fi
                continue
            fi
            run_leg "$leg" "$python" ".venv-$leg" "$pins" "${SUBSET[@]}" -q "${PYTEST_ARGS[@]}" \
                || failed+=("$leg") ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "== FAILED legs: ${failed[*]}" >&2
    exit 1
fi
echo "== all legs passed: ${LEGS[*]}"
