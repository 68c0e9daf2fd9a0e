"""The twistd plugin: ``twistd -n cgipool --config etc/pool.yaml``."""

from twisted.application.service import ServiceMaker

cgipool = ServiceMaker(
    "cgipool",
    "cgipool.tap",
    "Supervise and load-balance pools of worker processes, with a live admin dashboard.",
    "cgipool",
)
