"""Registers S2FT with PEFT in every process that imports peft (run at start-up by ``s2ft_plugin.pth``).

PEFT resolves an adapter's ``peft_type`` from its own registry, so without this an S2FT adapter loads only after
``import s2ft_plugin``; forgetting it gives a bare ``KeyError: 'S2FT'``. This finder waits until ``peft`` has finished
importing and then imports ``s2ft_plugin``; it costs nothing in processes that never import peft.
"""

import importlib.abc
import importlib.util
import sys
import warnings


class _RegisterAfterPeft(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)
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


if "peft" not in sys.modules:
    sys.meta_path.insert(0, _RegisterAfterPeft())
