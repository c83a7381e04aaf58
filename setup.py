"""Builds the optional native codec ``logq._native`` (cffi, see
native/build_native.py).  Without a working C compiler the build only warns
and logq installs as pure Python (``logq._codec`` then uses ``_codec_py``)."""

import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.sdist import sdist


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed C build into a warning."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler/linker failure
            self._skip(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            self._skip(e, ext.name)

    def _skip(self, err, name="the native codec"):
        msg = (f"logq: could not build {name} ({err}); "
               "installing the pure-Python codec only")
        warnings.warn(msg)
        print("WARNING: " + msg)


class SdistWithNative(sdist):
    """sdist that also ships the cffi build script, which setup() needs."""

    def make_distribution(self):
        for path in ("native/build_native.py", "native/logq_native.c", "native/logq_native.h"):
            if path not in self.filelist.files:
                self.filelist.append(path)
        super().make_distribution()


setup(
    cffi_modules=["native/build_native.py:ffibuilder"],
    cmdclass={"build_ext": OptionalBuildExt, "sdist": SdistWithNative},
)
