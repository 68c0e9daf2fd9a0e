"""The suite's own rule (issue 15): a test whose name does not say why has a docstring.

A name of five words or fewer ("test_bad_port", "test_merge") says what is
tried, rarely why it matters or what the answer must be; such a test carries a
docstring that does.  Longer names are left to review: this check is the floor.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import TestCase

HERE = os.path.dirname(os.path.abspath(__file__))

#: A test named in at most this many words needs a docstring.
SHORT_NAME_WORDS = 5


def short_names_without_docstrings(folder: str = HERE) -> list[str]:
    """``file:line name`` of every test method with a short name and no docstring."""
    found = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    and node.name.startswith("test_") \
                    and len(node.name.split("_")) - 1 <= SHORT_NAME_WORDS \
                    and not ast.get_docstring(node):
                found.append(f"{name}:{node.lineno} {node.name}")
    return found


class TestDocstringTests(TestCase):
    def test_every_short_named_test_says_why_in_a_docstring(self) -> None:
        missing = short_names_without_docstrings()
        self.assertEqual(missing, [], f"{len(missing)} tests named in {SHORT_NAME_WORDS} "
                                      "words or fewer have no docstring")

    def test_the_check_sees_a_short_name_without_a_docstring(self) -> None:
        """The rule is not vacuous: a file with one bare short test is reported."""
        folder = self.mktemp()
        os.makedirs(folder)
        with open(os.path.join(folder, "test_sample.py"), "w") as f:
            f.write("def test_merge():\n    pass\n\n"
                    "def test_two():\n    '''Why.'''\n\n"
                    "def test_a_long_name_that_says_why_it_matters():\n    pass\n")
        self.assertEqual(short_names_without_docstrings(folder), ["test_sample.py:1 test_merge"])
