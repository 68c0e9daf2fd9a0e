"""``tap.build()`` returns a typed daemon object: a CgipoolService holding its
parts as attributes given at construction, and wiring them without shared state."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cgipool.admin.app import AdminApp
from cgipool.admin.auth import AdminAuth
from cgipool.busypoll import BusyPollService
from cgipool.config import load
from cgipool.metrics import Metrics
from cgipool.proxy.edge import EdgeSite
from cgipool.reload import Reloader
from cgipool.supervisor.supervisor import Supervisor
from cgipool.tap import CgipoolService, ProxyService, build
from tests.support import require_binaries, search_service, write_config


class BuildTests(TestCase):
    def test_build_returns_the_daemon_with_its_parts(self) -> None:
        require_binaries("search.cgi")
        top = build(load(write_config(self, "\nservices:\n" + search_service(workers=1))),
                    reactor, loopback6=lambda: False)  # built, never started
        self.assertIsInstance(top, CgipoolService)
        parts = {"supervisor": Supervisor, "proxy": ProxyService, "metrics": Metrics,
                 "site": EdgeSite, "admin": AdminApp, "reloader": Reloader,
                 "busy_poll": BusyPollService, "auth": AdminAuth}
        for name, kind in parts.items():
            self.assertIsInstance(getattr(top, name), kind, name)
        self.assertIs(top.getServiceNamed("proxy"), top.proxy)
        self.assertIs(top.supervisor.parent, top)
        self.assertIs(top.sampler, top.admin.sampler)
        # One owner for the route resources: the reloader asks the proxy service.
        self.assertIs(top.reloader.resources, top.proxy)
        self.assertEqual(list(top.proxy.resources()), ["search"])
        self.assertIs(top.admin.reloader, top.reloader)  # offered once, by build
        with self.assertRaises(RuntimeError):
            top.admin.offer_reload(top.reloader)
