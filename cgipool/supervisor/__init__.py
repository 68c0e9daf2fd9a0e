"""Supervision: worker processes, their pools and the service that runs them."""
