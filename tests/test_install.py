"""A clean install: the Makefile's editable install of cgipool into a fresh venv
prints no warning (setuptools' package data and editable-mode deprecations used
to), and twistd, started from another folder, finds the cgipool plugin and
writes and reads its plugin cache without a word on stderr.

Bounded and offline: a copy of the project is installed with ``--no-deps
--no-build-isolation --no-index`` by the project venv's pip and setuptools into
a venv without pip, which borrows the project venv's packages (Twisted…) only
after the install, so the copy's own install is what twistd finds.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import ROOT

#: What the install needs of the project (README.md: the long description).
INSTALLED_FILES = ("setup.cfg", "pyproject.toml", "README.md", "cgipool", "cgipool_tools",
                   "twisted")
#: Any of these in pip's or twistd's output is a warning someone would read.
WARNING = re.compile(r"warn|deprecat|transitional|absent from|!!", re.IGNORECASE)
TWISTD = ("import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()")


def makefile_install_flags() -> list[str]:
    """The options the Makefile's venv target gives ``pip install -e``."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        for line in f:
            match = re.match(r"\s*\$\(BIN\)/pip install (.*?)-e '\.\[test\]'(.*)$", line)
            if match:
                return shlex.split(match.group(1)) + shlex.split(match.group(2))
    raise AssertionError("the Makefile no longer installs with `$(BIN)/pip install … -e '.[test]'`")


class CleanInstallTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        try:
            import setuptools
        except ImportError:
            raise SkipTest("the project venv has no setuptools: make venv") from None
        if int(setuptools.__version__.split(".")[0]) < 70:  # bdist_wheel built in
            raise SkipTest(f"setuptools {setuptools.__version__} in the project venv is "
                           "older than `make venv` installs: make venv")

    def run_quietly(self, argv: list[str], cwd: str, **env: str) -> str:
        """Run ``argv``; its combined output, failing on a non-zero exit."""
        environment = {**os.environ, "PIP_CONFIG_FILE": os.devnull,
                       "PIP_DISABLE_PIP_VERSION_CHECK": "1", **env}
        environment.pop("PYTHONWARNINGS", None)
        # A clean install sees only its venv: trial -j passes its own sys.path
        # to its workers as PYTHONPATH, which would find this checkout first.
        environment.pop("PYTHONPATH", None)
        done = subprocess.run(argv, cwd=cwd, env=environment, capture_output=True,
                              text=True, timeout=240)
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, f"{argv} failed:\n{output}")
        return output

    def test_the_makefiles_editable_install_is_quiet_and_twistd_finds_cgipool(self) -> None:
        flags = makefile_install_flags()
        self.assertNotIn("editable_mode=compat", " ".join(flags), "a deprecated mode")
        base = os.path.abspath(self.mktemp())
        project, venv, elsewhere = (os.path.join(base, n) for n in ("project", "venv", "cwd"))
        os.makedirs(project)
        os.makedirs(elsewhere)
        ignore = shutil.ignore_patterns("__pycache__", "dropin.cache", "*.egg-info")
        for name in INSTALLED_FILES:
            source = os.path.join(ROOT, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(project, name), ignore=ignore)
            else:
                shutil.copy2(source, os.path.join(project, name))
        self.run_quietly([sys.executable, "-m", "venv", "--without-pip", venv], base)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                             "['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        # The build backend runs in the new venv: lend it the project venv's setuptools.
        tools = os.path.join(base, "build-tools")
        os.makedirs(tools)
        here = sysconfig.get_paths()["purelib"]
        # (its dist-info too: setuptools registers its setup() keywords as entry points).
        for name in os.listdir(here):
            if name in ("setuptools", "pkg_resources", "_distutils_hack") \
                    or re.fullmatch(r"setuptools-[^-]+\.dist-info", name):
                os.symlink(os.path.join(here, name), os.path.join(tools, name))
        with open(os.path.join(site, "_build_tools.pth"), "w") as f:
            f.write(tools + "\n")

        pip = [sys.executable, "-m", "pip", "--python", python, "install",
               *[flag for flag in flags if flag not in ("--quiet", "-q")],
               "--verbose", "--no-deps", "--no-index", "-e", project]
        output = self.run_quietly(pip, elsewhere)
        self.assertIn("Successfully installed cgipool", output)
        warnings = [line for line in output.splitlines() if WARNING.search(line)]
        self.assertEqual(warnings, [], output)
        # Not the deprecated mode: a plain .pth naming the project folder.
        pths = [n for n in os.listdir(site) if n.startswith("__editable__")]
        self.assertEqual(len(pths), 1, pths)
        with open(os.path.join(site, pths[0])) as f:
            self.assertEqual(f.read().strip(), project)

        # Twisted and the rest from the project venv; cgipool from the copy only.
        os.remove(os.path.join(site, "_build_tools.pth"))
        with open(os.path.join(site, "_project_venv.pth"), "w") as f:
            f.write(here + "\n")
        cache = os.path.join(project, "twisted", "plugins", "dropin.cache")
        for run in ("writes the plugin cache", "reads it"):
            output = self.run_quietly([python, "-c", TWISTD, "--help"], elsewhere)
            self.assertRegex(output, r"\n\s+cgipool\s+Supervise", run)
            self.assertEqual([line for line in output.splitlines() if WARNING.search(line)],
                             [], run)
            self.assertTrue(os.path.exists(cache), run)
        where = self.run_quietly([python, "-c", "import twisted.plugins.cgipool_plugin as p, "
                                  "cgipool; print(p.__file__); print(cgipool.__file__)"],
                                 elsewhere)
        for line in where.split():
            self.assertTrue(line.startswith(project + os.sep), where)
        # The console script works from anywhere too.
        output = self.run_quietly([os.path.join(venv, "bin", "cgipool"), "--help"], elsewhere)
        self.assertIn("check-config", output)
