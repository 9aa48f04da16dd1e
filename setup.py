"""Everything is declared in pyproject.toml; this file only installs `llmkit_lm_eval_hook.pth`.

A .pth file must sit directly in site-packages, which pyproject metadata cannot express. Regular
wheels carry it at their root; editable installs (`pip install -e .`, as the Makefile does) never
copy build output, so there it is installed as a data file into this interpreter's site-packages.
"""
import os
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel
from setuptools.dist import Distribution

HOOK = "llmkit_lm_eval_hook.pth"


class BuildPyWithHook(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(HOOK, os.path.join(self.build_lib, HOOK))


class EditableWheelWithHook(editable_wheel):
    def run(self):
        site_packages = os.path.relpath(sysconfig.get_paths()["purelib"], sys.prefix)
        self.distribution.data_files = [(site_packages, [HOOK])]
        super().run()


class HookDistribution(Distribution):
    # setuptools' editable_wheel asks `has_data()`, a name Distribution lacks (it has has_data_files),
    # so without this it silently skips data files
    def has_data(self):
        return self.has_data_files()


setup(distclass=HookDistribution, cmdclass={"build_py": BuildPyWithHook, "editable_wheel": EditableWheelWithHook})
