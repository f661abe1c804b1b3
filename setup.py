"""Build the native parser.

DCGMRELAY_NO_EXTENSIONS=1 builds a pure-Python package (the ``_parser_py`` twin
is then used at run time); DCGMRELAY_CYTHON_ANNOTATE=1 writes the Cython HTML
annotation next to the sources.
"""
import os

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("DCGMRELAY_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    print("*********************\n* Pure Python build *\n*********************")
    setup()
else:
    from Cython.Build import cythonize

    print("**********************\n* Accelerated build *\n**********************")
    extensions = [
        Extension(
            "dcgmrelay._parser",
            ["src/dcgmrelay/_parser.pyx"],
            extra_compile_args=["-O3"],
        ),
        Extension(
            "dcgmrelay._encode",
            ["src/dcgmrelay/_encode.pyx"],
            extra_compile_args=["-O3"],
        ),
    ]
    setup(
        ext_modules=cythonize(
            extensions,
            annotate=bool(os.environ.get("DCGMRELAY_CYTHON_ANNOTATE")),
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "embedsignature": True,
            },
        )
    )
