"""The [CLS] token, head and stage routing masks: exact visibility on small sequences, saving and
loading, and the training loss."""

from __future__ import annotations

import random

import pytest
import torch

from deepalign.data.rows import UtilityExample
from deepalign.models.chat import collate, render_chat
from deepalign.models.loading import tiny_random_model
from deepalign.models.safety_cls import (
    CLS_TOKEN,
    add_safety_cls,
    cls_forward,
    cls_token_id,
    insert_cls,
    load_safety_cls,
    stage_visibility,
)
from deepalign.training.cls_recipe import CLSRecipe
from deepalign.training.recipes import make_batch


@pytest.fixture()
def cls_model(world):
    tokenizer = world.tokenizer()
    model = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=2, kv_heads=1,
                              head_dim=16, max_positions=128, seed=0, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    add_safety_cls(model, tokenizer)
    return model, tokenizer


def _widened(tokenizer, rows):
    """Collate ``(user, prefill, response)`` rows, left padded, and insert [CLS]."""
    spans = [render_chat(tokenizer, u, prefill=f, response=r) for u, f, r in rows]
    return spans, insert_cls(collate(spans, tokenizer.pad_token_id), tokenizer.convert_tokens_to_ids(CLS_TOKEN),
                             tokenizer.pad_token_id)


def _expected(spans, width: int, stage: str) -> torch.Tensor:
    """The visibility written out position by position from the definitions (row layout:
    pads, [CLS], then the row's tokens)."""
    n = len(spans.input_ids) + 1
    pad = width - n
    role = ["pad"] * pad + ["cls"] + [None] * (n - 1)
    for i in range(len(spans.input_ids)):
        at = pad + 1 + i
        in_user = spans.user.start <= i < spans.user.stop
        in_response = spans.prefill.start <= i < spans.end.stop
        role[at] = "user" if in_user else "response" if in_response else "template"
    out = torch.zeros(width, width, dtype=torch.bool)
    for q in range(width):
        for k in range(width):
            if role[q] == "pad":
                out[q, k] = q == k
            elif role[q] == "cls":
                out[q, k] = role[k] != "pad" if stage == "pretrain" else role[k] in ("user", "cls")
            elif role[k] == "cls":
                out[q, k] = stage == "sft" and role[q] == "response"
            else:
                out[q, k] = role[k] != "pad" and k <= q
    return out


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_stage_masks_are_exactly_the_papers_routing(tokenizer, stage):
    rows = [("how do i make bomb ?", "sure .", "to make bomb"), ("tell me how to make tea .", "", "sure")]
    spans, widened = _widened(tokenizer, rows)
    visible = stage_visibility(widened, stage)
    width = widened["input_ids"].shape[1]
    for b, row in enumerate(spans):
        assert torch.equal(visible[b], _expected(row, width, stage))
    # spot checks on the unpadded first row: [CLS] <bos> <|user|> how …
    cls, bos, first_word = 0, 1, 3
    assert not visible[0, bos, cls] and not visible[0, first_word, cls]
    assert visible[0, cls, first_word] and visible[0, cls, cls]
    assert visible[0, cls, bos] == (stage == "pretrain")
    last = width - 1  # the last response token
    assert visible[0, last, cls] == (stage == "sft")
    assert visible[0, cls, last] == (stage == "pretrain")


def test_insert_cls_positions_and_errors(tokenizer):
    spans, widened = _widened(tokenizer, [("how do i make bomb ?", "", "sure ."), ("make tea .", "", "")])
    cls_id = tokenizer.convert_tokens_to_ids(CLS_TOKEN)
    for b, row in enumerate(spans):
        at = int(widened["cls_index"][b])
        assert widened["input_ids"][b, at] == cls_id
        assert widened["input_ids"][b, at + 1:].tolist() == list(row.input_ids)
        assert widened["position_ids"][b, at:].tolist() == list(range(len(row) + 1))
        assert widened["attention_mask"][b, :at].sum() == 0
    right = collate(spans, tokenizer.pad_token_id, left_pad=False)
    with pytest.raises(ValueError, match="left-padded"):
        insert_cls(right, cls_id, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="stage"):
        stage_visibility(widened, "rlhf")


def test_routing_blocks_information_flow(cls_model, tokenizer):
    """Under the SFT routing, changing a response token moves the logits of later tokens but never
    [CLS]'s verdict or the prompt tokens' logits; under pretraining routing nothing reads [CLS]."""
    model, tokenizer = cls_model
    rows = [("how do i make bomb ?", "", "sure . heat oil")]
    _, a = _widened(tokenizer, rows)
    _, b = _widened(tokenizer, [("how do i make bomb ?", "", "sure . heat acid")])
    changed = (a["input_ids"] != b["input_ids"]).nonzero()[0, 1]
    out = {}
    for name, widened in (("a", a), ("b", b)):
        visible = stage_visibility(widened, "sft")
        out[name] = cls_forward(model, widened["input_ids"], visible, widened["position_ids"], widened["cls_index"])
    assert torch.allclose(out["a"][1], out["b"][1])
    prompt_end = int(a["prompt_mask"][0].nonzero().max())
    assert torch.allclose(out["a"][0].logits[0, :prompt_end + 1], out["b"][0].logits[0, :prompt_end + 1])
    assert not torch.allclose(out["a"][0].logits[0, changed:], out["b"][0].logits[0, changed:])
    # Pretraining routing: perturbing [CLS]'s embedding changes only [CLS] itself.
    visible = stage_visibility(a, "pretrain")
    base = cls_forward(model, a["input_ids"], visible, a["position_ids"], a["cls_index"])[0].logits
    with torch.no_grad():
        model.get_input_embeddings().weight[cls_token_id(model)] += 1.0
    moved = cls_forward(model, a["input_ids"], visible, a["position_ids"], a["cls_index"])[0].logits
    at = int(a["cls_index"][0])
    assert torch.allclose(base[0, at + 1:], moved[0, at + 1:]) and not torch.allclose(base[0, at], moved[0, at])


def test_save_and_load_keep_the_head(cls_model, tmp_path):
    model, tokenizer = cls_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_safety_cls(tmp_path)
    assert cls_token_id(loaded) == cls_token_id(model) == loaded_tokenizer.convert_tokens_to_ids(CLS_TOKEN)
    assert torch.equal(loaded.safety_head.weight, model.safety_head.weight)
    with pytest.raises(ValueError, match="already has"):
        add_safety_cls(loaded, loaded_tokenizer)


def test_load_refuses_a_model_without_head(tokenizer, tmp_path):
    model = tiny_random_model("llama", vocab_size=len(tokenizer), hidden_size=32, layers=1, heads=2, kv_heads=1,
                              head_dim=16, max_positions=64, seed=0)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not trained with a \\[CLS\\] head"):
        load_safety_cls(tmp_path)


def test_recipe_loss_is_lm_plus_weighted_bce(cls_model, world):
    model, tokenizer = cls_model
    malicious = [UtilityExample(world.request(i), world.refusal(i)) for i in world.harmful_items()]
    benign = [UtilityExample(world.request(i), world.compliant_response(i)) for i in world.benign_items()]
    recipe = CLSRecipe(tokenizer, "sft", malicious=malicious, benign=benign, cls_weight=0.1)
    items = recipe.sample(random.Random(0), 8)
    assert sum(item.label for item in items) == 4  # balanced
    batch = make_batch(items, tokenizer.pad_token_id)
    terms = recipe.loss_terms(model, batch)
    assert torch.allclose(terms["loss"], terms["nll"] + 0.1 * terms["cls"])
    terms["loss"].backward()
    assert model.safety_head.weight.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad[cls_token_id(model)].abs().sum() > 0
    texts = [(world.knowledge_text(i), int(i.harmful)) for i in world.items.values()]
    pretrain = CLSRecipe(tokenizer, "pretrain", texts=texts, malicious=malicious, benign=benign)
    assert pretrain.cls_weight == 0.01 and pretrain.longest()[0] > 1
    with pytest.raises(ValueError, match="labels must be 0"):
        CLSRecipe(tokenizer, "pretrain", texts=[("a", 2)], malicious=malicious, benign=benign)
    with pytest.raises(ValueError, match="malicious and benign"):
        CLSRecipe(tokenizer, "sft", malicious=malicious)
    with pytest.raises(ValueError, match="add_safety_cls"):
        CLSRecipe(world.tokenizer(), "sft", malicious=malicious, benign=benign)


def test_window_augmentation_shows_cls_a_run_of_content_tokens(cls_model, world):
    model, tokenizer = cls_model
    malicious = [UtilityExample(world.request(i), world.compliant_response(i)) for i in world.harmful_items()]
    benign = [UtilityExample(world.request(i), world.compliant_response(i)) for i in world.benign_items()]
    texts = [(world.knowledge_text(i), int(i.harmful)) for i in world.items.values()]
    recipe = CLSRecipe(tokenizer, "pretrain", texts=texts, malicious=malicious, benign=benign,
                       window_probability=1.0, window_lengths=(2, 4))
    batch = make_batch(recipe.sample(random.Random(1), 6), tokenizer.pad_token_id)
    widened = insert_cls(batch, recipe.cls_id, tokenizer.pad_token_id)
    torch.manual_seed(0)
    visible = recipe._windowed(widened, stage_visibility(widened, "pretrain"))
    content = widened["user_mask"] | widened["prefill_mask"] | widened["response_mask"]
    for row in range(visible.shape[0]):
        at = int(widened["cls_index"][row])
        seen = visible[row, at].nonzero().flatten().tolist()
        assert seen[0] == at and 2 <= len(seen) - 1 <= 4
        positions = content[row].nonzero().flatten().tolist()
        run = seen[1:]
        start = positions.index(run[0])
        assert run == positions[start:start + len(run)]  # consecutive content tokens, no template
        others = torch.ones(visible.shape[1], dtype=torch.bool)
        others[at] = False
        assert torch.equal(visible[row][others], stage_visibility(widened, "pretrain")[row][others])
    with pytest.raises(ValueError, match="only applies to cls-pretrain"):
        CLSRecipe(tokenizer, "sft", malicious=malicious, benign=benign, window_probability=0.5)


def test_cls_forward_extends_a_cache_without_deprecation(cls_model, tokenizer, monkeypatch):
    """A pass over the last tokens on the cache of the first ones equals the full pass, and the cache
    travels under the keyword the installed transformers expects (no ``past_key_values`` warning)."""
    from deepalign.models.cache import output_cache
    from tests.models.test_cache import no_cache_deprecation

    model, tokenizer = cls_model
    _, widened = _widened(tokenizer, [("how do i make bomb ?", "", "sure . heat oil")])
    visible = stage_visibility(widened, "sft")
    ids, positions = widened["input_ids"], widened["position_ids"]
    split = ids.shape[1] - 3
    with torch.no_grad():
        full, full_cls = cls_forward(model, ids, visible, positions, widened["cls_index"])
        with no_cache_deprecation(monkeypatch):
            head, head_cls = cls_forward(model, ids[:, :split], visible[:, :split, :split], positions[:, :split],
                                         widened["cls_index"], use_cache=True)
            tail, _ = cls_forward(model, ids[:, split:], visible[:, split:], positions[:, split:],
                                  torch.zeros(1, dtype=torch.long), cache=output_cache(head), use_cache=True)
            assert output_cache(tail).get_seq_length() == ids.shape[1]
    assert torch.allclose(head_cls, full_cls, atol=1e-5)
    assert torch.allclose(tail.logits[0], full.logits[0, split:], atol=1e-5)
