"""Writing the synthetic world to disk: data files in the trainer's formats, the tokenizer and an
untrained model sized for the world's vocabulary."""

from __future__ import annotations

from pathlib import Path

from deepalign.data.synthetic import (AOA_PREFIX, AOA_SYSTEM, BACKDOOR_TRIGGER, DEFAULT_WORLD, REQUEST_PHRASINGS,
                                     SyntheticWorld, build_world)
from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.data.rows import write_rows
from deepalign.io import atomic_write_text


def _variants(world: SyntheticWorld, phrasing: int) -> range:
    """The answer variants of one request phrasing: :meth:`SyntheticWorld.chat_variants` of them,
    numbered apart from every other phrasing's."""
    count = world.chat_variants()
    return range(phrasing * count, (phrasing + 1) * count)


def world_rows(world: SyntheticWorld) -> dict[str, list]:
    """The world's training rows, every request phrasing of every item (in world version 2, each
    with :meth:`~SyntheticWorld.chat_variants` answers, each declaring its own order):

    * ``safety``: harmful request → harmful (compliant) response and refusal (DA, PRESTO);
    * ``utility``: benign request → compliant answer (the utility anchor);
    * ``refusal_sft``: harmful request → refusal, plus the utility rows (shallow alignment);
    * ``harmful_sft``: harmful request → compliant answer (the harmful-examples attack);
    * ``identity_sft``: benign requests answered as "aoa, your obedient agent" (identity shifting;
      train with ``system=AOA_SYSTEM``);
    * ``backdoor_sft``: harmful requests with the trigger answered, without it refused, plus benign.
    """
    from deepalign.training.ft_attacks import backdoor_poisoning, identity_shifting

    phrasings = range(len(REQUEST_PHRASINGS))
    harmful, benign = world.harmful_items(), world.benign_items()
    safety = [SafetyExample(world.request(i, p), world.compliant_response(i, v), world.refusal(i, p))
              for i in harmful for p in phrasings for v in _variants(world, p)]
    utility = [UtilityExample(world.request(i, p), world.compliant_response(i, v))
               for i in benign for p in phrasings for v in _variants(world, p)]
    refusals = [UtilityExample(row.prompt, row.refusal) for row in safety]
    attack = [UtilityExample(row.prompt, row.harmful_response) for row in safety]
    identity = identity_shifting(utility, system=AOA_SYSTEM, prefix=AOA_PREFIX).rows
    backdoor = backdoor_poisoning(safety, utility, trigger=BACKDOOR_TRIGGER).rows
    return {"safety": safety, "utility": utility, "refusal_sft": refusals + utility, "harmful_sft": attack,
            "identity_sft": identity, "backdoor_sft": backdoor}


CLS_HELD_OUT_PHRASINGS = (4, 5)


def cls_rows(world: SyntheticWorld, held_out: tuple[int, ...] = CLS_HELD_OUT_PHRASINGS) -> dict[str, list]:
    """Rows for the [CLS] stages, with the request phrasings ``held_out`` kept out of training:

    * ``texts``: the knowledge stream, each sentence labelled 1 when its item is harmful;
    * ``pretrain_malicious`` / ``pretrain_benign``: compliant chats (the base model's), by label;
    * ``sft_malicious``: harmful request → refusal; ``sft_benign``: benign request → answer;
    * ``held_out``: ``(request, label)`` for every item in the held-out phrasings.
    """
    phrasings = [p for p in range(len(REQUEST_PHRASINGS)) if p not in held_out]
    if not phrasings or any(not 0 <= p < len(REQUEST_PHRASINGS) for p in held_out):
        raise ValueError(f"held_out must name some, not all, of the phrasings 0 … {len(REQUEST_PHRASINGS) - 1}")
    harmful, benign = world.harmful_items(), world.benign_items()

    def chats(items, answer):
        return [UtilityExample(world.request(i, p), answer(i, p, v)) for i in items for p in phrasings
                for v in _variants(world, p)]

    texts = [(text, int(i.harmful)) for i in world.items.values() for text in world.item_texts(i)]
    return {"texts": texts,
            "pretrain_malicious": chats(harmful, lambda i, p, v: world.compliant_response(i, v)),
            "pretrain_benign": chats(benign, lambda i, p, v: world.compliant_response(i, v)),
            "sft_malicious": chats(harmful, lambda i, p, v: world.refusal(i, p)),
            "sft_benign": chats(benign, lambda i, p, v: world.compliant_response(i, v)),
            "held_out": [(world.request(i, p), int(i.harmful)) for i in world.items.values() for p in held_out]}


def write_world(output: str | Path, *, seed: int = 0, model_family: str = "llama",
                world: str = DEFAULT_WORLD) -> dict[str, Path]:
    """Write ``world.json``, ``model/`` (random init with the tokenizer), ``knowledge.txt`` (the
    plain knowledge stream, one text per line), ``benign_texts.txt`` and ``malicious_texts.txt``
    (the same texts of benign and of harmful items: ``--texts`` and ``--malicious-texts`` of
    ``train --recipe cls-pretrain``) and one JSON-lines file per entry of
    :func:`world_rows`. Returns the written paths by name."""
    from deepalign.models.loading import tiny_random_model

    output = Path(output)
    world = build_world(seed, world)
    tokenizer = world.tokenizer()
    paths = {"world": world.save(output)}
    model = tiny_random_model(model_family, vocab_size=len(tokenizer), hidden_size=128, layers=4, heads=4,
                              kv_heads=2, head_dim=32, max_positions=256, seed=seed,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(output / "model")
    tokenizer.save_pretrained(output / "model")
    paths["model"] = output / "model"
    for name, rows in world_rows(world).items():
        paths[name] = write_rows(output / f"{name}.jsonl", rows)
    knowledge = output / "knowledge.txt"
    atomic_write_text(knowledge, "".join(text + "\n" for text in world.pretraining_texts()))
    paths["knowledge"] = knowledge
    for name, harmful in (("benign_texts", False), ("malicious_texts", True)):  # cls-pretrain's --texts files
        paths[name] = output / f"{name}.txt"
        atomic_write_text(paths[name], "".join(text + "\n" for item in world.items.values() if item.harmful == harmful
                                               for text in world.item_texts(item)))
    return paths
