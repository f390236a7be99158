"""Attacking a model behind the [CLS] defense (Li & Kim): the callables our attacks take.

* :func:`cls_generate` → ``generate(prompts, prefills, sampling, seed)`` for the prefilling and
  decoding-parameter attacks: every response is decoded by
  :class:`~deepalign.models.cls_decoding.DefendedDecoder` (re-classification, strategic decoding);
* :func:`cls_rap` → ``attack(prompts, prefills, selector, config)`` for RAP: the attacker queries
  the defended model's served next-token logits (a prefilling API behind the defense), one prompt
  at a time; a token the defense will not emit is never a candidate.
"""

from __future__ import annotations

from deepalign.attacks.rap import rap_attack_unbatched
from deepalign.models.cls_decoding import DefendedDecoder


def cls_generate(decoder: DefendedDecoder, *, progress: bool = False):
    def generate(prompts, prefills, sampling, seed):
        outputs = decoder.generate_many(prompts, prefills, sampling, seed=seed,
                                        max_new_tokens=sampling.max_new_tokens, progress=progress)
        return [output.text for output in outputs]

    return generate


def cls_rap(decoder: DefendedDecoder):
    def attack(prompts, prefills, selector, config):
        return rap_attack_unbatched(decoder.model, decoder.tokenizer, prompts, prefills, selector, config,
                                    next_logits=decoder.next_token_logits)

    return attack
