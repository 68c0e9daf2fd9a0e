"""The twistd plugins: ``twistd -n cgipool --config etc/pool.yaml``, and cgipool's
reactor (the epoll reactor that can busy-poll, for ``busy_poll_us``), which
``twistd cgipool`` installs unless ``--reactor`` named another one; ``twistd
--reactor cgipool …`` and ``trial --reactor cgipool …`` name it."""

from twisted.application.reactors import Reactor
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class CgipoolServiceMaker:
    """twistd's ``ServiceMaker("cgipool", "cgipool.tap", …)``, except that
    reading the options first installs cgipool's reactor when none is installed
    yet: twistd has parsed ``--reactor`` by then, and cgipool.tap's imports
    (Klein) would install the default reactor."""

    tapname = "cgipool"
    #: The module that holds Options and makeService, as twistd's ServiceMaker names it.
    module = "cgipool.tap"
    description = ("Supervise and load-balance pools of worker processes, "
                   "with a live admin dashboard.")

    @property
    def options(self):  # type: ignore[no-untyped-def]
        from cgipool.busypoll import install_default

        install_default()
        from cgipool.tap import Options

        return Options

    def makeService(self, options):  # type: ignore[no-untyped-def]
        from cgipool.tap import makeService

        return makeService(options)


cgipool = CgipoolServiceMaker()

cgipool_reactor = Reactor(
    "cgipool",
    "cgipool.busypoll",
    "The epoll reactor with busy polling (cgipool's busy_poll_us).",
)
