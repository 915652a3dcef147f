"""The tunnels: state machine, pool, SSH boundary, probe, dialer and inventory sources."""
