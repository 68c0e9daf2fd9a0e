"""Request-derived text in log lines (cgipool.logtext.printable)."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from cgipool.logtext import printable


class PrintableTests(TestCase):
    def test_controls_are_escaped_and_the_rest_kept(self) -> None:
        """A request path cannot forge log lines or drive the reader's terminal (CR, LF,
        ESC, NUL, DEL, C1 CSI all escaped), yet non-ASCII letters stay readable."""
        self.assertEqual(printable(b"/a\x1b[31mred\r\nfake line\x00\x7f\x9b"),
                         "/a\\x1b[31mred\\r\\nfake line\\x00\\x7f\\x9b")
        self.assertEqual(printable("caf\u00e9 \u4e2d"), "caf\u00e9 \u4e2d")

    def test_bidi_overrides_and_line_separators_are_escaped(self) -> None:
        """U+202E makes a line read backwards from where it stands; U+2028 is a
        line break to some viewers: both shown as escapes."""
        self.assertEqual(printable("/x\u202egnp.exe\u2028next\u2066"),
                         "/x\\u202egnp.exe\\u2028next\\u2066")

    def test_limit_cuts_before_escaping(self) -> None:
        """The limit counts characters of the text itself, and a cut is marked with an
        ellipsis so a shortened value is never taken for the whole one."""
        self.assertEqual(printable(b"abcdef", 3), "abc\u2026")
