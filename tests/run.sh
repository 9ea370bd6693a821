#!/usr/bin/env bash
# The test command: `bash tests/run.sh [pytest args]`.
# Installs what the tests need when it is missing (see launch/python_env.sh for which environment),
# then runs the whole suite. The SLURM tests need a running cluster (`bash launch/local_cluster.sh up 2`);
# without one they are skipped, unless MEGALATENT_REQUIRE_SLURM=1 (as in CI) makes that a failure.
# Two pytest-xdist workers, each taking a whole test file at a time (module fixtures are built once):
# single-process tests on one core overlap with multi-rank ones on the other, in collection order (conftest puts
# the longest files first; without --no-loadscope-reorder xdist orders files by their number of tests, which
# left the SLURM file, 3 tests but minutes of jobs, to run alone at the end). `-n 0` runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/python_env.sh dev,mpi,vision
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PYTHON" -m pytest -n 2 --dist loadfile --no-loadscope-reorder "$@"
