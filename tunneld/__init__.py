"""tunneld: an SSH-tunnel proxy gateway for control-plane to node traffic."""

__version__ = "0.1.0"
