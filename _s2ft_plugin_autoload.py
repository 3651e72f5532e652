"""Registers S2FT with PEFT in every process that imports peft (run at start-up by ``s2ft_plugin.pth``).

PEFT resolves an adapter's ``peft_type`` from its own registry, so without this an S2FT adapter loads only after
``import s2ft_plugin``; forgetting it gives a bare ``KeyError: 'S2FT'``. This finder waits until ``peft`` has finished
importing and then imports ``s2ft_plugin``; it costs nothing in processes that never import peft or bitsandbytes.

It also drops one notice of bitsandbytes (>= 0.50, imported by peft): on CPUs with AVX512-BF16 it tries to fetch a
faster 4-bit CPU kernel from the Hugging Face Hub through the optional ``kernels`` package and, when that package is
not installed, logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" in every
process. Its own built-in CPU kernel is used instead, and this project runs offline, so the ``bnb`` extra does not
install ``kernels`` (it downloads kernels at run time). The notice is dropped only for that missing package: a user
who installs ``kernels`` still sees why a download failed.
"""

import importlib.abc
import importlib.util
import sys
import warnings


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending = {"peft", "bitsandbytes"}  # peft imports bitsandbytes; other code may import it directly

    def find_spec(self, name, path=None, target=None):
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        if name == "bitsandbytes":
            _drop_missing_kernels_notice()
            return None  # the ordinary finders import it
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_peft = spec.loader.exec_module

        def exec_then_register(module):
            exec_peft(module)
            try:
                import s2ft_plugin  # noqa: F401
            except Exception as error:  # a broken plugin must not break peft itself
                warnings.warn(f"s2ft_plugin could not register the PEFT type 'S2FT': {error!r}")

        spec.loader.exec_module = exec_then_register
        return spec


def _drop_missing_kernels_notice():
    import logging

    def keep(record):
        missing = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")
                    and isinstance(missing, ModuleNotFoundError) and missing.name == "kernels")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(keep)


if "peft" not in sys.modules:
    sys.meta_path.insert(0, _RegisterAfterPeft())
