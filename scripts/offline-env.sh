
# MEDFUSE_OFFLINE: appended by `make install`. Hospitals run air-gapped and nothing here may
# talk to any address but 127.0.0.1, so every Flower/Ray process started from this venv
# (including `flwr run .` and the SuperLink it auto-starts) runs without telemetry,
# update checks, usage stats or runtime dependency installation, with Ray on loopback.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export RAY_USAGE_STATS_ENABLED=0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
