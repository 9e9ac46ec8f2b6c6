"""Build of anact's optional C extensions; the metadata lives in pyproject.toml.

``anact._powersums`` (one-pass power sums for the training monitor and the eager
per-tensor ReLU/LeakyReLU statistics on CPU) and ``anact._nactcpu`` (the normalized
activation's passes over float32 and bfloat16 CPU memory, the ``"native"`` backend of
:mod:`anact.kernels`) are optional: where no C compiler is
available the install still succeeds and anact uses its PyTorch code (same numbers,
slower).
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
        # fused multiply-adds in exp's polynomial; no a·b + c whose rounding the eager
        # code's results depend on (outputs are (y − b)·s, gradients g·δ'·s)
        # -pthread, dl: the passes split large tensors over torch's thread count, in the
        # OpenMP team of the runtime torch loaded (looked up with dlopen) or on pthreads
        Extension("anact._nactcpu", ["src/anact/_nactcpu.c"],
                  extra_compile_args=flags + ([] if sys.platform == "win32" else
                                              ["-ffp-contract=fast", "-pthread"]),
                  extra_link_args=[] if sys.platform == "win32" else ["-pthread"],
                  libraries=([] if sys.platform == "win32" else
                             ["m", "dl"] if sys.platform.startswith("linux") else ["m"]),
                  optional=True),
    ],
)
