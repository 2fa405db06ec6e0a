#!/bin/sh
# Entrypoint of the mqexec worker image (Docker/Podman ENTRYPOINT, Apptainer %runscript).
#   docker run IMAGE worker --broker amqps://... --concurrency 8     -> mqexec worker ...
#   docker run IMAGE --concurrency 8                                 -> mqexec worker --concurrency 8
#   apptainer exec IMAGE mqexec dirac-boot worker ...                (DIRAC jobs bypass this script)
#   docker run IMAGE sh                                              -> any other command runs as given
set -eu
case "${1:-}" in
    "") set -- worker ;;
    -*) set -- worker "$@" ;;
esac
case "$1" in
    worker|dirac-boot|status|flower) exec mqexec "$@" ;;
    *) exec "$@" ;;
esac
