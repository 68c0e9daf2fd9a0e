"""The admin pages and API, a Klein app mounted at ``/admin``."""
