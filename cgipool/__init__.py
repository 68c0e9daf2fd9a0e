"""cgipool: one Twisted daemon that supervises worker pools, balances requests
across them and shows it all on a live admin dashboard."""

__version__ = "0.1.0"
