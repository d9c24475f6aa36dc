# Shared by the hooks (sourced): where the client is, where the request id is kept.

# The client: PORTAGENT_REQUEST if set, else portagent-request on PATH, else the
# standard-library client from the checkout this plugin came from.
portagent_request() {
  if [ -n "${PORTAGENT_REQUEST:-}" ]; then
    "$PORTAGENT_REQUEST" "$@"
  elif command -v portagent-request >/dev/null 2>&1; then
    portagent-request "$@"
  else
    local plugin_dir
    plugin_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    PYTHONPATH="$plugin_dir/../../client/src${PYTHONPATH:+:$PYTHONPATH}" \
      python3 -m portagent.request "$@"
  fi
}

# One file per job, keyed by BUILDKITE_JOB_ID (only [A-Za-z0-9-] kept: it names a file).
portagent_id_file() {
  local job="${BUILDKITE_JOB_ID:-}"
  job="${job//[^A-Za-z0-9-]/}"
  if [ -z "$job" ]; then
    echo "portagent: BUILDKITE_JOB_ID is not set" >&2
    return 1
  fi
  echo "${TMPDIR:-/tmp}/portagent-request-$job"
}

portagent_broker_env() {
  export PORTAGENT_BROKER_URL="${BUILDKITE_PLUGIN_PORTAGENT_BROKER:?portagent plugin: broker is required}"
  if [ -n "${BUILDKITE_PLUGIN_PORTAGENT_CA:-}" ]; then
    export PORTAGENT_BROKER_CA="$BUILDKITE_PLUGIN_PORTAGENT_CA"
  fi
}
