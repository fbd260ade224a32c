"""Build sllmctl's C extension in place (for machines without a package index, where
`pip install -e .` cannot fetch its build requirements)."""

from setuptools import Extension, setup

setup(
    name="sllmctl-native",
    ext_modules=[Extension("sllmctl.native._fastio", ["sllmctl/native/_fastio.c"],
                           extra_compile_args=["-O3", "-pthread", "-std=c11"],
                           extra_link_args=["-pthread"])],
    script_args=["build_ext", "--inplace", "-q"],
)
