"""The seam between twisted.web's ``Request`` and our edge (cgipool.proxy.webbridge).

A ``Request`` writes to its ``channel``; :class:`WebChannel` is that channel for
one exchange, as twisted.web's own ``H2Stream`` is for HTTP/2.  These tests fail
loudly when a Twisted release asks more of a channel than WebChannel offers
(``make test-twisted-latest`` runs them against the newest Twisted).
"""

from __future__ import annotations

import inspect
import re

import twisted.web.http
import twisted.web.server
from twisted.trial.unittest import TestCase

from cgipool.proxy.webbridge import WebChannel

#: What a Request may read of its channel and WebChannel does not provide, on
#: purpose: ``factory`` (present, Request would log itself: the pipeline's
#: access-log stage does) and the bad-multipart answer (never reached: webbridge
#: turns form parsing off).
NOT_PROVIDED = {"factory", "_respondToBadRequestAndDisconnect"}


class ChannelContractTests(TestCase):
    def test_every_channel_attribute_a_request_uses_is_provided(self) -> None:
        """Each ``self.channel.<name>`` in twisted.web's Request code exists on
        WebChannel (or is one of the deliberate NOT_PROVIDED)."""
        used: set[str] = set()
        for module in (twisted.web.http, twisted.web.server):
            for cls in (getattr(module, "Request"),):
                source = inspect.getsource(cls)
                used |= set(re.findall(r"self\.channel\.(\w+)", source))
        self.assertIn("writeHeaders", used, "the scan found Request's channel calls")
        missing = sorted(name for name in used - NOT_PROVIDED
                         if not hasattr(WebChannel, name) and name not in WebChannel.__slots__)
        self.assertEqual(missing, [], "twisted.web's Request asks its channel for more "
                                      "than cgipool.proxy.webbridge.WebChannel has")

    def test_write_headers_has_the_signature_request_calls(self) -> None:
        """Request calls ``channel.writeHeaders(version, code, reason, headers)``."""
        source = inspect.getsource(twisted.web.http.Request.write)
        self.assertRegex(source, r"self\.channel\.writeHeaders\(\s*version,\s*code,"
                                 r"\s*reason,\s*self\.responseHeaders\)")
        params = list(inspect.signature(WebChannel.writeHeaders).parameters)
        self.assertEqual(params, ["self", "version", "code", "reason", "headers"])
