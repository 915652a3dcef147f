"""The fronts of the gateway. They see tunnels only through :class:`proxy.dialer.Dialer`."""
