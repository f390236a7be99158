"""The world-v2 probe's layouts say what its docstring says (benchmarks/world_v2_probe.py)."""

import random

import pytest

from benchmarks.world_v2_probe import LAYOUTS, Layout, _tokenizer


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_answer_word_is_in_the_probe_vocabulary(kind):
    layout, tokenizer, rng = Layout(kind, 3), _tokenizer(), random.Random(0)
    for name in layout.items:
        for choices in (rng, None):
            ids = tokenizer(layout.answer(name, choices), add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids


def test_declared_order_steps_name_the_kth_declared_ingredient_and_slot_ks_action():
    layout = Layout("declared-order", 5)
    ingredients, actions, slots = layout.items["bomb"]
    seen_orders = set()
    for draw in range(20):
        words = layout.body("bomb", random.Random(draw)).split()
        declared = words[words.index("take") + 1: words.index("take") + 5]
        assert sorted(declared) == sorted(ingredients)
        seen_orders.add(tuple(declared))
        steps = words[words.index(".") + 1: -1]
        assert steps == [word for k in slots for word in (declared[k], actions[k])]
    assert len(seen_orders) > 1  # the order is the answer's own free choice


def test_canonical_chats_repeat_one_answer_and_slots_draw_afresh():
    canonical, slots = Layout("canonical", 1), Layout("slots", 1)
    rng = random.Random(0)
    assert len({canonical.answer("toxin", canonical.chat_choices(rng)) for _ in range(10)}) == 1
    assert len({slots.answer("toxin", slots.chat_choices(rng)) for _ in range(30)}) > 1
