"""Build of anact's one optional C extension; the metadata lives in pyproject.toml.

``anact._powersums`` (one-pass power sums for the training monitor on CPU) is
optional: where no C compiler is available the install still succeeds and the
monitor uses its PyTorch fallback (same numbers, slower).
"""

import sys

from setuptools import Extension, setup

# -fno-trapping-math: lets the compiler vectorize the branch-free selects (no FP traps used)
flags = [] if sys.platform == "win32" else [
    "-O3", "-fopenmp-simd", "-fno-trapping-math", "-std=c11",
]

setup(
    ext_modules=[
        Extension("anact._powersums", ["src/anact/_powersums.c"], extra_compile_args=flags,
                  optional=True),
    ],
)
