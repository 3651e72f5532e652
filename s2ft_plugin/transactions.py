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
import hashlib
import os
import shutil
import socket
import tempfile
from contextvars import ContextVar
from typing import Optional

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError

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
            except BaseException as error:
                for tuner in created:
                    if tuner.model is model:
                        tuner.unload()
                        for name in set(vars(model)) - attributes:
                            delattr(model, name)
                        for parameter, requires_grad in trainable:
                            parameter.requires_grad_(requires_grad)
                if created and isinstance(error, SafetensorError):
                    raise _named(error, kwargs.get("model_id", args[0] if args else None), kwargs) from error
                raise

    return from_pretrained


def _load_adapter(original):
    @functools.wraps(original)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        is_new = adapter_name not in self.peft_config
        with adapter_load():
            try:
                return original(self, model_id, adapter_name, *args, **kwargs)
            except BaseException as error:
                if is_new and _is_s2ft(self) and adapter_name in self.peft_config:
                    self.delete_adapter(adapter_name)
                if _is_s2ft(self) and isinstance(error, SafetensorError):
                    raise _named(error, model_id, kwargs) from error
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
        _remove_dead_staging(parent, os.path.basename(save_directory))
        staging = tempfile.mkdtemp(prefix=_staging_prefix(os.path.basename(save_directory)) + _owner(), dir=parent)
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


def _staging_prefix(name: str) -> str:
    return f".{name}.saving-"


def _owner(pid: Optional[int] = None) -> str:
    """The saving process, as staging folders name it: "<pid>-<host>-" (a save on another machine of a shared
    filesystem is nobody's to judge here)."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{os.getpid() if pid is None else pid}-{host}-"


def _remove_dead_staging(parent: str, name: str) -> None:
    """Remove the staging folders that saves to ``name`` killed midway left behind: those whose process has ended
    (this machine's), and unmarked ones from earlier versions."""
    prefix = _staging_prefix(name)
    for entry in os.listdir(parent):
        if not entry.startswith(prefix) or not os.path.isdir(os.path.join(parent, entry)):
            continue
        pid, host, *_ = entry[len(prefix):].split("-") + ["", ""]
        if not pid.isdigit():
            dead = True
        elif _owner(int(pid)) != f"{pid}-{host}-":
            continue  # another machine's save
        else:
            dead = not _alive(int(pid))
        if dead:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _named(error: SafetensorError, model_id, kwargs: dict) -> SafetensorError:
    """safetensors' own errors name no file ("incomplete metadata"): the same error type, naming the adapter's file."""
    folder = os.path.join(str(model_id), kwargs.get("subfolder") or "")
    path = os.path.join(folder, SAFETENSORS_WEIGHTS_NAME)
    where = path if os.path.isfile(path) else f"{SAFETENSORS_WEIGHTS_NAME} of {str(model_id)!r}"
    return SafetensorError(f"Cannot read the S2FT adapter weights {where} (truncated or not a safetensors file): {error}")


@contextlib.contextmanager
def weights_named(model_id, kwargs: dict):
    """While active, an unreadable weights file raises naming the adapter's file (see :func:`_named`)."""
    try:
        yield
    except SafetensorError as error:
        raise _named(error, model_id, kwargs) from error


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
