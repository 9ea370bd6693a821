#!/usr/bin/env bash
# The test command: `bash tests/run.sh [pytest args]`.
# Installs what the tests need when it is missing (see launch/python_env.sh for which environment),
# then runs the whole suite. The SLURM tests need a running cluster (`bash launch/local_cluster.sh up 2`);
# without one they are skipped, unless MEGALATENT_REQUIRE_SLURM=1 (as in CI) makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python_env.sh dev,mpi,vision
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m pytest "$@"
