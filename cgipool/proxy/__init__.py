"""The reverse proxy: routing, balancing, upstream connections, forwarding."""
