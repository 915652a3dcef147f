"""Operating the daemon: status API, readiness endpoints, metrics, logs, sd_notify and the lifecycle."""
