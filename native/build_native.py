"""cffi build script (out-of-line API mode) for ``logq._native``.

Used by setup.py (``cffi_modules``); run directly to build
``logq/_native*.so`` in place (same as ``python setup.py build_ext --inplace``)::

    python native/build_native.py
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ffibuilder = FFI()
with open(os.path.join(HERE, "logq_native.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "logq._native",
    "#include <stddef.h>\n#include <stdint.h>\n#include \"logq_native.h\"\n",
    sources=["native/logq_native.c"],
    include_dirs=["native"],
    extra_compile_args=["-O2", "-pthread"],
    extra_link_args=["-pthread"],
    depends=["native/logq_native.c", "native/logq_native.h"],
)

if __name__ == "__main__":
    # The paths above are relative to the repository root, as setuptools wants
    # them: build through setup.py, in place.
    import subprocess
    import sys
    subprocess.check_call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT)
