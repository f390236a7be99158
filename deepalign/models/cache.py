"""The KV cache keyword of Hugging Face forwards, whichever transformers 5.x is installed.

transformers renamed the forward keyword ``past_key_values`` to ``cache`` (and the output field
likewise): 5.17 takes and returns ``past_key_values``; 5.24 takes ``cache`` and still accepts
``past_key_values`` with a ``FutureWarning`` (removed in 5.40), and its outputs hold ``cache`` (the
old attribute is a property that logs a deprecation). The name is read from the model's forward
signature (once per model class), not from version strings, so both sides of the rename work
without a warning::

    out = model(ids, use_cache=True, **cache_kwargs(model, cache))
    cache = output_cache(out)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

NEW, OLD = "cache", "past_key_values"


def cache_keyword(model) -> str:
    """``"cache"`` or ``"past_key_values"``: the keyword ``model``'s forward takes its KV cache under."""
    return _class_keyword(type(model))


def cache_kwargs(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` (``cache`` may be ``None``: a fresh cache)."""
    return {cache_keyword(model): cache}


def output_cache(output):
    """The cache a forward returned: the ``cache`` field where the output class has one, else
    ``past_key_values`` (older transformers, or any object with that attribute)."""
    if dataclasses.is_dataclass(output):
        names = {f.name for f in dataclasses.fields(output)}
    else:
        names = set(getattr(output, "__dict__", ()))
    return getattr(output, NEW if NEW in names else OLD, None)


@functools.lru_cache(maxsize=None)
def _class_keyword(model_class: type) -> str:
    """From the declared parameters of ``forward`` (``inspect.signature`` follows
    ``functools.wraps``, so transformers' ``deprecate_kwarg`` wrapper shows the real forward). A
    forward taking only ``**kwargs`` (a wrapper such as PEFT's) says nothing: then decide as
    transformers' own outputs are named."""
    try:
        parameters = inspect.signature(model_class.forward).parameters
    except (AttributeError, TypeError, ValueError):
        parameters = {}
    if NEW in parameters:
        return NEW
    if OLD in parameters:
        return OLD
    return _library_keyword()


@functools.lru_cache(maxsize=None)
def _library_keyword() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return NEW if NEW in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else OLD
