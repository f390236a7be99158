"""The KV cache keyword helper: the name comes from the forward's signature, the cache back from the
output's fields, on either side of transformers' ``past_key_values`` → ``cache`` rename."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import warnings
from types import SimpleNamespace

import torch

from deepalign.models.cache import cache_keyword, cache_kwargs, output_cache
from deepalign.models.loading import tiny_random_model


@contextlib.contextmanager
def no_cache_deprecation(monkeypatch):
    """Fails if transformers warns (``warnings`` or ``logger.warning_once``, which would print only
    once per process) about ``past_key_values`` / ``cache_params`` inside the block."""
    logged: list[str] = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    messages = [str(w.message) for w in caught] + logged
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m], messages


class NewStyle(torch.nn.Module):
    def forward(self, input_ids, cache=None, use_cache=False):
        return SimpleNamespace(cache=cache)


class OldStyle(torch.nn.Module):
    def forward(self, input_ids, past_key_values=None, use_cache=False):
        return SimpleNamespace(past_key_values=past_key_values)


def _renaming(function):  # like transformers' deprecate_kwarg: a functools.wraps wrapper
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        if "past_key_values" in kwargs:
            warnings.warn("`past_key_values` is deprecated", FutureWarning)
            kwargs["cache"] = kwargs.pop("past_key_values")
        return function(*args, **kwargs)

    return wrapped


class Wrapped(torch.nn.Module):
    @_renaming
    def forward(self, input_ids, cache=None, use_cache=False):
        return SimpleNamespace(cache=cache)


@dataclasses.dataclass
class NewOutput:
    logits: object = None
    cache: object = None

    @property
    def past_key_values(self):  # the deprecated alias transformers keeps
        raise AssertionError("the deprecated alias was read")


def test_keyword_follows_the_forward_signature():
    assert cache_keyword(NewStyle()) == "cache" and cache_keyword(OldStyle()) == "past_key_values"
    assert cache_keyword(Wrapped()) == "cache"  # through the decorator
    marker = object()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Wrapped()(None, **cache_kwargs(Wrapped(), marker)).cache is marker
    assert OldStyle()(None, **cache_kwargs(OldStyle(), marker)).past_key_values is marker


def test_real_model_keyword_is_the_installed_transformers_one():
    import transformers

    declared = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    expected = "cache" if "cache" in declared else "past_key_values"
    assert cache_keyword(tiny_random_model()) == expected


def test_output_cache_reads_the_field_not_the_alias():
    marker = object()
    assert output_cache(NewOutput(cache=marker)) is marker
    assert output_cache(SimpleNamespace(past_key_values=marker)) is marker
    assert output_cache(SimpleNamespace(cache=marker)) is marker


def test_a_real_cached_forward_has_no_deprecation(monkeypatch):
    model = tiny_random_model(seed=0)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        with no_cache_deprecation(monkeypatch):
            first = model(ids[:, :3], use_cache=True)
            second = model(ids[:, 3:], use_cache=True, **cache_kwargs(model, output_cache(first)))
            cache = output_cache(second)
    assert cache is not None and cache.get_seq_length() == 5
    assert torch.allclose(second.logits[0, -1], full, atol=1e-5)
