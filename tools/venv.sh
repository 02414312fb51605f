# Sourced by run.sh and test.sh: make .venv (Python 3.11+) and install the pinned
# requirements into it, again only when they changed since the last successful install.

ensure_venv() {
    local python="${PYTHON:-python3}"
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "taskapp needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
        return 1
    fi
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv"
        # On Debian/Ubuntu, venv needs the python3-venv package; leave no half-made .venv behind.
        "$python" -m venv .venv || {
            rm -rf .venv
            echo "'$python -m venv' failed (on Debian/Ubuntu: apt install python3-venv)" >&2
            return 1
        }
    fi
    local stamp=.venv/.requirements.sha256 wanted
    wanted="$(cat requirements.txt requirements-dev.txt | .venv/bin/python -c \
        'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        echo "installing requirements-dev.txt into .venv"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
        echo "$wanted" >"$stamp"
    fi
    # The project itself, editable and without dependencies (they are the pins above): it
    # puts the `taskapp` command (pyproject.toml's [project.scripts]) into .venv/bin.
    local project_stamp=.venv/.project.sha256 project
    project="$(.venv/bin/python -c \
        'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
    if [ ! -x .venv/bin/taskapp ] || [ "$(cat "$project_stamp" 2>/dev/null)" != "$project" ]; then
        echo "installing the taskapp command into .venv"
        .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
        echo "$project" >"$project_stamp"
    fi
}
