"""PEFT's adapter entry points made all-or-nothing for S2FT models.

PEFT's ``from_pretrained`` wraps (and S2FT co-permutes) the caller's model before it reads the adapter's weights, and
``load_adapter`` registers a new adapter before loading it, so a failure on the way (a missing, truncated or refused
weights file, an adapter that does not fit the model) would leave the model wrapped, permuted or holding a half-made
adapter; ``save_pretrained`` over an existing adapter would destroy it if interrupted. PEFT offers no hook for any of
this, so :func:`install` wraps the three ``PeftModel`` methods; they behave exactly as before for other PEFT types.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from contextvars import ContextVar
from typing import Optional

from peft import PeftModel

_LOADING: ContextVar[bool] = ContextVar("s2ft_loading", default=False)
_CREATED: ContextVar[Optional[list]] = ContextVar("s2ft_created_tuners", default=None)


def loading() -> bool:
    """True while an adapter is being loaded: its saved ``permute`` is then a preference, not a requirement."""
    return _LOADING.get()


def adapter_load():
    """Marks the duration as an adapter load (see :func:`loading`)."""
    return _context(_LOADING, True)


def note_created(tuner) -> None:
    """Called by each new S2FT tuner, so a failing ``from_pretrained`` can take it off the caller's model."""
    created = _CREATED.get()
    if created is not None:
        created.append(tuner)


@contextlib.contextmanager
def _context(var: ContextVar, value):
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def _from_pretrained(original):
    @functools.wraps(original)
    def from_pretrained(cls, model, *args, **kwargs):
        attributes = set(vars(model))
        trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        with adapter_load(), _context(_CREATED, []) as created:
            try:
                return original(cls, model, *args, **kwargs)
            except BaseException:
                for tuner in created:
                    if tuner.model is model:
                        tuner.unload()
                        for name in set(vars(model)) - attributes:
                            delattr(model, name)
                        for parameter, requires_grad in trainable:
                            parameter.requires_grad_(requires_grad)
                raise

    return from_pretrained


def _load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        is_new = adapter_name not in self.peft_config
        with adapter_load():
            try:
                return original(self, model_id, adapter_name, *args, **kwargs)
            except BaseException:
                if is_new and _is_s2ft(self) and adapter_name in self.peft_config:
                    self.delete_adapter(adapter_name)
                raise

    return load_adapter


def _save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _is_s2ft(self) or not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        save_directory = os.path.abspath(save_directory)
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(save_directory)}.saving-", dir=parent)
        try:
            card = os.path.join(save_directory, "README.md")
            if os.path.isfile(card):  # PEFT updates an existing model card rather than replacing it
                shutil.copy2(card, staging)
            original(self, staging, *args, **kwargs)
            for root, _, files in os.walk(staging):
                target = os.path.join(save_directory, os.path.relpath(root, staging))
                os.makedirs(target, exist_ok=True)
                for name in files:
                    os.replace(os.path.join(root, name), os.path.join(target, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return save_pretrained


def _is_s2ft(peft_model) -> bool:
    from .model import S2FTModel

    return isinstance(getattr(peft_model, "base_model", None), S2FTModel)


def install() -> None:
    """Wrap ``PeftModel.from_pretrained``, ``load_adapter`` and ``save_pretrained`` (once per process)."""
    if getattr(PeftModel, "_s2ft_transactions", False):
        return
    PeftModel.from_pretrained = classmethod(_from_pretrained(PeftModel.from_pretrained.__func__))
    PeftModel.load_adapter = _load_adapter(PeftModel.load_adapter)
    PeftModel.save_pretrained = _save_pretrained(PeftModel.save_pretrained)
    PeftModel._s2ft_transactions = True
