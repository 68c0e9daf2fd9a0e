"""The admin's credentials are kept from workers and scripts, and a service
cannot set the admin's cookie (``cgipool.credentials``); the request paths'
use of it is tested end to end in tests/test_hostile_admin.CredentialTests."""

from __future__ import annotations

from base64 import b64encode, urlsafe_b64encode

from twisted.trial.unittest import TestCase

from cgipool.cgi import parse_cgi_header
from cgipool.credentials import SESSION_COOKIE, AdminCredentials, sets_admin_cookie
from cgipool.proxy.forward import request_head, response_headers

TOKEN = b"s3cret-admin-token-0123456789"
SESSION = SESSION_COOKIE + b"=abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"


class ScrubTests(TestCase):
    def setUp(self) -> None:
        self.credentials = AdminCredentials(TOKEN)

    def test_only_the_session_cookie_leaves_the_cookie_header(self) -> None:
        scrub = self.credentials.scrub_cookie
        self.assertEqual(scrub(b"a=1; " + SESSION + b"; b=2"), b"a=1; b=2")
        self.assertEqual(scrub(SESSION + b"; b=2"), b"b=2")
        self.assertEqual(scrub(b"a=1;" + SESSION), b"a=1")
        self.assertIsNone(scrub(SESSION))
        self.assertIsNone(scrub(b" " + SESSION + b" ;"), "only blanks are left")
        # Look-alike names are someone else's cookies.
        for other in (b"cgipool_admin2=x", b"xcgipool_admin=x", b"Cgipool_Admin=x"):
            self.assertEqual(scrub(other), other)
        self.assertEqual(scrub(b"a=1; b=2"), b"a=1; b=2")
        # Joined with commas (a client, not a browser), or with no space.
        self.assertEqual(scrub(b"a=1, " + SESSION), b"a=1")
        self.assertEqual(scrub(b"a=1," + SESSION + b",b=2"), b"a=1,b=2")
        self.assertEqual(scrub(b"a=1;" + SESSION + b";b=2"), b"a=1;b=2")

    def test_an_authorization_with_the_token_is_recognised_in_any_scheme(self) -> None:
        carries = self.credentials.is_admin_authorization
        self.assertTrue(carries(b"Bearer " + TOKEN))
        self.assertTrue(carries(b"bearer  " + TOKEN + b" "))
        self.assertTrue(carries(b"Basic " + b64encode(b"admin:" + TOKEN)))
        self.assertTrue(carries(b"Token " + TOKEN))
        self.assertFalse(carries(b"Bearer the-service-s-own-token"))
        self.assertFalse(carries(b"Basic " + b64encode(b"user:pass")))
        self.assertFalse(carries(b"Basic !!not-base64!!"))
        # Spellings a client may use: no padding, base64url, a tab after the scheme.
        bare = b64encode(b"admin:" + TOKEN + b"x").rstrip(b"=")
        self.assertTrue(carries(b"Basic " + bare))
        self.assertTrue(carries(b"Basic " + urlsafe_b64encode(b"\xfb\xff:" + TOKEN)))
        self.assertTrue(carries(b"Basic\t" + b64encode(b"admin:" + TOKEN)))
        self.assertFalse(AdminCredentials(None).is_admin_authorization(b"Bearer " + TOKEN))

    def test_request_head_drops_them_and_keeps_the_rest(self) -> None:
        parts, _ = request_head(b"GET", b"/", [
            (b"Host", b"h"), (b"Cookie", b"a=1; " + SESSION),
            (b"Cookie", SESSION), (b"Authorization", b"Bearer " + TOKEN),
            (b"X-Other", b"kept")], None, self.credentials)
        head = b"".join(parts)
        self.assertIn(b"Cookie: a=1\r\n", head)
        self.assertEqual(head.count(b"Cookie:"), 1)
        self.assertNotIn(b"Authorization", head)
        self.assertNotIn(TOKEN, head)
        self.assertIn(b"X-Other: kept\r\n", head)


class SetCookieTests(TestCase):
    """A service may set its own cookies, never the admin's (cookie tossing:
    browsers send a host's cookies to every port, the admin's included)."""

    def test_set_cookie_of_the_admin_cookie_is_recognised(self) -> None:
        self.assertTrue(sets_admin_cookie(SESSION + b"; Path=/admin; HttpOnly"))
        self.assertTrue(sets_admin_cookie(SESSION_COOKIE + b" =x"))
        self.assertFalse(sets_admin_cookie(b"session=1; Path=/"))
        self.assertFalse(sets_admin_cookie(b"cgipool_admin_x=1"))

    def test_a_workers_set_cookie_of_it_is_dropped(self) -> None:
        headers, length = response_headers([(b"Set-Cookie", b"mine=1"),
                                            (b"Set-Cookie", SESSION + b"; Path=/admin"),
                                            (b"Content-Length", b"0")], b"today")
        self.assertEqual([v for k, v in headers if k == b"Set-Cookie"], [b"mine=1"])
        self.assertNotIn(SESSION, b"".join(v for _, v in headers))
        # The rest is kept: the length, and our Server and Date.
        self.assertEqual(length, 0)
        self.assertIn((b"Content-Length", b"0"), headers)
        self.assertIn((b"Date", b"today"), headers)
        self.assertIn(b"Server", [k for k, _ in headers])

    def test_a_scripts_set_cookie_of_it_is_dropped(self) -> None:
        response = parse_cgi_header(b"Content-Type: text/plain\r\nSet-Cookie: mine=1\r\n"
                                    b"Set-Cookie: " + SESSION + b"; Path=/admin")
        cookies = [v for k, v in response.headers if k.lower() == b"set-cookie"]
        self.assertEqual(cookies, [b"mine=1"])


class CookieValuesTests(TestCase):
    def test_every_value_of_the_name_in_order(self) -> None:
        """A page of a service can plant a second cookie of the admin's name
        (document.cookie): the admin must see both, not only the last."""
        from cgipool.credentials import cookie_values

        self.assertEqual(cookie_values([b"a=1; " + SESSION + b"; cgipool_admin=planted",
                                        b"cgipool_admin=third"]),
                         [SESSION.split(b"=", 1)[1], b"planted", b"third"])
        self.assertEqual(cookie_values([b"a=1; cgipool_admin2=x"]), [])
