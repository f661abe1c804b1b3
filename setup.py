"""Build the native parser and encoder.

DCGMRELAY_NO_EXTENSIONS=1 builds a pure-Python package (the ``_parser_py`` and
``_encode_py`` twins are then used at run time); DCGMRELAY_CYTHON_ANNOTATE=1 writes
the Cython HTML annotation next to the sources.

The extensions list their ``.pyx`` sources and are cythonized only when build_ext
runs: an sdist then carries the ``.pyx`` (never generated C) and building it needs
Cython (in build-system.requires) but no earlier generated file.

Where the C compiler fails (none installed, no Python headers) the install goes on
without the native core, saying so: dcgmrelay then runs on the pure-Python twins and
``dcgmrelay.implementation()`` answers ``"py"``.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError, CompileError

NO_EXTENSIONS = bool(os.environ.get("DCGMRELAY_NO_EXTENSIONS"))


class cythonize_build_ext(build_ext):
    def finalize_options(self) -> None:
        from Cython.Build import cythonize

        exts = cythonize(
            self.distribution.ext_modules,
            annotate=bool(os.environ.get("DCGMRELAY_CYTHON_ANNOTATE")),
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "embedsignature": True,
            },
        )
        for ext in exts:  # cythonize's copies lose it
            ext.optional = True
        self.distribution.ext_modules = exts
        super().finalize_options()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, CompileError, BaseError) as exc:
            # the extension is optional: setuptools goes on without it after this
            print(f"\n*** {ext.name} not built ({exc}): dcgmrelay will run on the pure-Python twin, "
                  "whose parsing is many times slower. Install a C compiler and the Python headers for the native "
                  "core. ***\n", file=sys.stderr)
            raise


def _extension(name: str) -> Extension:
    return Extension(f"dcgmrelay.{name}", [f"src/dcgmrelay/{name}.pyx"], extra_compile_args=["-O3"])


if NO_EXTENSIONS:
    print("*********************\n* Pure Python build *\n*********************")
    setup()
else:
    print("**********************\n* Accelerated build *\n**********************")
    setup(ext_modules=[_extension("_parser"), _extension("_encode")], cmdclass={"build_ext": cythonize_build_ext})
