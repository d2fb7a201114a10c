#!/usr/bin/env bash
# The local stack (S3 server, MLflow with artifacts on it, Ray head with the job API), all on 127.0.0.1.
#
#   infra/local/stack.sh up [--num-cpus 4]    # prints the URLs and the variables to export
#   infra/local/stack.sh status
#   infra/local/stack.sh down                 # stops everything and checks nothing is left
#
# State (pids, ports, URLs) and data live in $STACK_DIR (default: .stack at the repository root).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
action="${1:?usage: stack.sh up|down|status [options]}"
shift
exec "$python" -m dragonfly_platform.services "$action" --dir "${STACK_DIR:-$repo/.stack}" "$@"
