"""Sliding windows with a KV cache: which keys a query sees, and which of them are prefill.

Hugging Face's definition (transformers 5.x, ``transformers/masking_utils.py``)::

    def causal_mask_function(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= q_idx
    def sliding_window_overlay(sliding_window):
        def inner_mask(batch_idx, head_idx, q_idx, kv_idx):
            return kv_idx > q_idx - sliding_window
    sliding_window_causal_mask_function(w) = and_masks(sliding_window_overlay(w), causal_mask_function)

with ``q_idx`` the query's absolute position. With ``Tq`` queries appended to a cache of
``Tk − Tq`` keys (bottom-right aligned), query ``i`` is at ``q_idx = i + (Tk − Tq)``, so it sees
key ``j`` iff ``j ≤ i + (Tk − Tq)`` and ``j > i + (Tk − Tq) − w``. The expected masks below are
written out by hand from that rule; a hypothesis test checks the kernel's visibility against a
double loop over Hugging Face's own mask functions.

``deepalign.models.attention.keys_mask`` places a prefill mask over the sequence so far onto the
keys of one attention call: padded with False past its end, or cut to its *last* ``num_keys``
positions when a sliding-window cache holds only the most recent keys. The end-to-end test decodes
a Mistral model with a sliding-window cache and compares the collected mass with eager attention
over the whole sequence.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from deepalign.kernels import prefill_attention
from deepalign.kernels.attention import AttentionMask, visible_keys
from deepalign.models.attention import collect_prefill_mass, keys_mask
from deepalign.models.loading import tiny_random_model


def visibility(num_queries, num_keys, window, *, query_pos=None, key_padding_mask=None, causal=True):
    spec = AttentionMask(causal, window, None, 1.0)
    query_pos = torch.arange(num_queries) if query_pos is None else torch.tensor(query_pos)
    out = visible_keys(spec, query_pos, torch.arange(num_keys), num_queries, num_keys, key_padding_mask)
    return out.int().tolist()


# (Tq, Tk, window) → the [Tq, Tk] mask, by hand.
HAND_WRITTEN = {
    # offset Tk − Tq = 4: query i sees j ≤ i + 4 and j > i + 1
    (3, 7, 3): [[0, 0, 1, 1, 1, 0, 0],
                [0, 0, 0, 1, 1, 1, 0],
                [0, 0, 0, 0, 1, 1, 1]],
    # offset 3, window 4: j ≤ i + 3 and j > i − 1 (two new tokens after a 3-key sliding cache)
    (2, 5, 4): [[1, 1, 1, 1, 0],
                [0, 1, 1, 1, 1]],
    # offset 5, window 2: one decoding step sees itself and the key before it
    (1, 6, 2): [[0, 0, 0, 0, 1, 1]],
    # window 1: only the query's own key
    (2, 4, 1): [[0, 0, 1, 0],
                [0, 0, 0, 1]],
    # window larger than the cache: plain bottom-right causal
    (2, 4, 9): [[1, 1, 1, 0],
                [1, 1, 1, 1]],
    # no window: bottom-right causal, offset 4
    (3, 7, None): [[1, 1, 1, 1, 1, 0, 0],
                   [1, 1, 1, 1, 1, 1, 0],
                   [1, 1, 1, 1, 1, 1, 1]],
}


@pytest.mark.parametrize("shape", sorted(HAND_WRITTEN, key=str), ids=str)
def test_visibility_with_a_cache_and_a_window_is_the_hand_written_mask(shape):
    num_queries, num_keys, window = shape
    assert visibility(num_queries, num_keys, window) == [[HAND_WRITTEN[shape]]]


def test_visibility_of_a_query_chunk_and_with_left_padding():
    # Queries 1 and 2 of the (3, 7, 3) case, as the chunked reference computes them.
    assert visibility(3, 7, 3, query_pos=[1, 2]) == [[HAND_WRITTEN[(3, 7, 3)][1:]]]
    padding = torch.tensor([[False, False, False, True, True, True, True],
                            [True, True, True, True, True, True, True]])
    assert visibility(3, 7, 3, key_padding_mask=padding) == [
        [[[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]]],
        [HAND_WRITTEN[(3, 7, 3)]],
    ]


@given(num_queries=st.integers(1, 12), num_keys=st.integers(1, 12),
       window=st.one_of(st.none(), st.integers(1, 14)), start=st.integers(0, 11))
def test_visibility_matches_a_double_loop_over_the_hugging_face_mask_functions(num_queries, num_keys, window, start):
    start = min(start, num_queries - 1)
    offset = num_keys - num_queries
    rule = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    want = [[int(bool(rule(0, 0, torch.tensor(i + offset), torch.tensor(j)))) for j in range(num_keys)]
            for i in range(start, num_queries)]
    got = visibility(num_queries, num_keys, window, query_pos=list(range(start, num_queries)))
    assert got == [[want]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kernel_attends_uniformly_over_exactly_the_hand_written_keys(backend):
    """With q = 0 every visible score is equal, so P is uniform over the visible keys: the mass is
    |visible ∩ prefill| / |visible| and out is the mean of the visible values, from the hand mask."""
    num_queries, num_keys, window = 3, 7, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 2, num_queries, 32)
    k = torch.randn(1, 1, num_keys, 32, generator=gen)
    v = torch.randn(1, 1, num_keys, 32, generator=gen)
    prefill = torch.tensor([[True, False, True, True, False, False, True]])
    out, mass = prefill_attention(q, k, v, prefill, window=window, backend=backend)
    # Visible keys {2,3,4}, {3,4,5}, {4,5,6}; prefill keys {0,2,3,6}.
    assert torch.allclose(mass[0], torch.tensor([[2 / 3, 1 / 3, 1 / 3]] * 2), atol=1e-6)
    for i, keys in enumerate(([2, 3, 4], [3, 4, 5], [4, 5, 6])):
        assert torch.allclose(out[0, :, i], v[0, 0, keys].mean(0).expand(2, -1), atol=1e-5)


def test_keys_mask_pads_past_the_end_and_keeps_the_last_keys_of_a_sliding_cache():
    prefill = torch.tensor([[False, True, True, False, False, False],
                            [False, False, False, True, True, False]])
    # More keys than mask positions (generated tokens): False past the end.
    assert keys_mask(prefill, 2, 8, torch.device("cpu")).int().tolist() == [
        [0, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    # A sliding-window cache holding the last 4 of the 6 positions: keys are positions 2..5.
    assert keys_mask(prefill, 2, 4, torch.device("cpu")).int().tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    assert keys_mask(prefill, 2, 6, torch.device("cpu")).tolist() == prefill.tolist()
    with pytest.raises(ValueError, match="batch size 2 but the model was called with 3"):
        keys_mask(prefill, 3, 6, torch.device("cpu"))


def test_decoding_with_a_sliding_window_cache_collects_the_eager_mass():
    """Mistral with sliding_window = 4: the cache keeps the last keys only, so decoding calls see
    fewer keys than the sequence has tokens. Each call is given the prefill mask over the sequence
    so far (the collector's contract); its masses must equal eager attention on the full sequence
    at the same query positions."""
    window, length = 4, 11
    model = tiny_random_model("mistral", vocab_size=97, layers=2, max_positions=64, seed=0,
                              attn_implementation="deepalign", sliding_window=window)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 97, (2, length), generator=gen)
    attention = torch.ones(2, length, dtype=torch.long)
    attention[1, :2] = 0  # row 1 is left-padded
    prefill = torch.zeros(2, length, dtype=torch.bool)
    prefill[0, 2:5] = True
    prefill[1, 4:7] = True
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(ids, attention_mask=attention, output_attentions=True).attentions
    model.set_attn_implementation("deepalign")
    want = torch.stack([(p * prefill[:, None, None, :]).sum(-1) for p in probs])  # [L, B, H, T]
    cache, checked = None, 0
    for start, stop in ((0, 6), (6, 8), (8, 9), (9, 10), (10, 11)):
        with torch.no_grad(), collect_prefill_mass(prefill[:, :stop], backend="torch") as collected:
            step = model(ids[:, start:stop], attention_mask=attention[:, :stop], past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        got = collected.stacked()  # [L, B, H, stop − start]
        real = attention[:, start:stop].bool()[None, :, None, :].expand_as(got)
        error = (got - want[..., start:stop])[real].abs().max().item()
        assert error < 1e-5, f"positions {start}..{stop - 1}: mass differs from eager by {error:.3g}"
        checked += int(real.sum())
    # The later calls really ran on a cut cache (fewer keys than positions) and saw prefill mass.
    assert checked == 2 * 4 * 2 * length - 2 * 4 * 2
    assert want[..., 6:].abs().max() > 0.05
