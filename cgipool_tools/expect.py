"""What a good answer to an example is, and whether an answer is one.

An example of the status document (``/admin/api/status``, written by
:meth:`cgipool.config.Example.as_status`) says a status and, optionally, a
content type, texts the body contains and a JSON value the body matches.  The
smoke and stress tests judge every answer with :meth:`Expectation.judge`, so
any HTTP service can be tested — HTML pages, git's smart protocol — and a
body is read only when the example asks about it.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from cgipool_tools.client import clean, excerpt

#: Failure kinds, as the tools count them ("HTTP 503" for a wrong status).
CONTENT_TYPE = "content type"
BODY = "body"
JSON_BODY = "json"


class BadExample(ValueError):
    """An example entry in the status document the tools cannot use."""


@attrs.frozen
class Failure:
    """Why an answer is not the one expected: a kind to count, a detail to show."""

    kind: str
    detail: str


@attrs.frozen
class Expectation:
    """A good answer: ``status`` always; the rest only when given."""

    status: int = 200
    #: A lower-case media type, ``type/subtype`` or ``type/*``; None: any.
    content_type: str | None = None
    contains: tuple[bytes, ...] = ()
    #: The JSON value the body matches (see :func:`json_mismatch`); unset: any body.
    json: Any = None
    has_json: bool = False

    @classmethod
    def from_example(cls, example: Any) -> Expectation:
        """Read an example of the status document; :class:`BadExample` says why not."""
        if not isinstance(example, dict):
            raise BadExample(f"expected an object, got {clean(example, 60)}")
        status = example.get("status", 200)
        if isinstance(status, bool) or not isinstance(status, int) \
                or not 100 <= status <= 599:
            raise BadExample(f"status {clean(status, 20)} is not an HTTP status")
        content_type = example.get("content_type")
        if content_type is not None and (not isinstance(content_type, str)
                                         or "/" not in content_type):
            raise BadExample(f"content_type {clean(content_type, 60)} is not a media type")
        contains = example.get("contains") or []
        if isinstance(contains, str):
            contains = [contains]
        if not isinstance(contains, list) or not all(isinstance(c, str) and c
                                                     for c in contains):
            raise BadExample(f"contains {clean(contains, 60)} is not a list of texts")
        return cls(status, content_type.lower() if content_type else None,
                   tuple(c.encode("utf-8") for c in contains),
                   example.get("json"), example.get("json") is not None)

    @property
    def reads_headers(self) -> bool:
        return self.content_type is not None

    @property
    def reads_body(self) -> bool:
        return bool(self.contains) or self.has_json

    def judge(self, status: int, content_type: bytes | None, body: bytes,
              parsed: Any = None) -> Failure | None:
        """None for a good answer, else the first thing that is wrong.

        ``parsed`` is the body already read as JSON by the caller (or None).
        """
        if status != self.status:
            return Failure(f"HTTP {status}", f"expected {self.status}, got {status}: "
                                             f"{excerpt(body)}")
        if self.content_type is not None:
            got = media_type(content_type)
            if not media_type_matches(self.content_type, got):
                return Failure(CONTENT_TYPE, f"content type {clean(got or 'none', 80)}, "
                                             f"expected {self.content_type}")
        for text in self.contains:
            if text not in body:
                return Failure(BODY, f"the body does not contain "
                                     f"{clean(text.decode('utf-8'), 60)!r}: {excerpt(body)}")
        if self.has_json:
            if parsed is None:
                try:
                    parsed = json.loads(body)
                except ValueError:
                    return Failure(JSON_BODY, f"the body is not JSON: {excerpt(body)}")
            problem = json_mismatch(self.json, parsed)
            if problem is not None:
                return Failure(JSON_BODY, f"json {problem}")
        return None

    def describe(self) -> str:
        """What of the body passed, for a report line ('' when nothing was asked)."""
        parts = []
        if self.contains:
            n = len(self.contains)
            parts.append(f"{n} text{'s' if n != 1 else ''} found")
        if self.has_json:
            parts.append("json matched")
        return ", ".join(parts)


def media_type(value: bytes | None) -> str | None:
    """``b"Text/HTML; charset=utf-8"`` -> ``"text/html"``; None without a value."""
    if value is None:
        return None
    text = value.decode("latin-1").split(";", 1)[0].strip().lower()
    return text or None


def media_type_matches(expected: str, got: str | None) -> bool:
    if got is None:
        return False
    if expected.endswith("/*"):
        return got.startswith(expected[:-1])
    return got == expected


def json_mismatch(expected: Any, actual: Any, where: str = "") -> str | None:
    """Where ``actual`` does not match ``expected``, or None.

    Objects match when every expected key is there with a matching value (more
    keys are fine); lists when they have the same length and match item by
    item; everything else when equal (``true`` is not ``1``, ``1`` is ``1.0``).
    """
    at = where or "the body"
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{at}: expected an object, got {_kind(actual)}"
        for key, value in expected.items():
            path = f"{where}.{key}" if where else str(key)
            if key not in actual:
                return f"{path}: missing"
            problem = json_mismatch(value, actual[key], path)
            if problem is not None:
                return problem
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return f"{at}: expected a list, got {_kind(actual)}"
        if len(actual) != len(expected):
            return f"{at}: expected {len(expected)} items, got {len(actual)}"
        for i, (want, got) in enumerate(zip(expected, actual)):
            problem = json_mismatch(want, got, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if _same(expected, actual):
        return None
    return f"{at}: expected {_show(expected)}, got {_show(actual)}"


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool) \
            or expected is None or actual is None:
        return type(expected) is type(actual) and expected == actual
    if isinstance(expected, (int, float)):
        return isinstance(actual, (int, float)) and expected == actual
    return type(expected) is type(actual) and expected == actual


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return _show(value)


def _show(value: Any) -> str:
    return clean(json.dumps(value), 60)


def pid_of(parsed: Any) -> int | None:
    """The worker pid a JSON object body names (the sample services do), or None."""
    if isinstance(parsed, dict):
        pid = parsed.get("pid")
        if type(pid) is int:
            return pid
    return None

