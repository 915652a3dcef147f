"""The embedded dev cluster: simulated nodes (asyncssh sshd + kubelet-like server) and a gateway in one process."""
