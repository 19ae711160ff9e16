"""Build hook for Silo's optional C accelerators; everything else is in pyproject.toml.

Each ``silo/storage/_<name>.c`` becomes the extension module ``silo.storage._<name>``.
They are optional on purpose: a machine without a C compiler or Python headers still
installs Silo, and the Python code falls back to its pure-Python path (slower, same
behaviour). A fresh machine of ours has gcc and the headers, so they are normally built.
"""

from glob import glob
from pathlib import Path

from setuptools import Extension, setup

setup(ext_modules=[
    Extension(f"silo.storage.{Path(src).stem}", [src], optional=True,
              extra_compile_args=["-O2", "-std=c11", "-Wall"])
    for src in sorted(glob("silo/storage/_*.c"))
])
