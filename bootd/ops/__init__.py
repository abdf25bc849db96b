"""What the daemon tells its operator and its host: logs, metrics, sd_notify, limits."""
