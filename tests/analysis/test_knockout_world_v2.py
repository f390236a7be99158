"""The knockout property of world version 2 (issue 17): its answers cannot be continued without reading
themselves, so that a later change to the world cannot silently remove the dependency PRESTO cuts.

The base model of the demo's quick settings (``deepalign demo --quick --world v2``: a 2-layer Llama of
width 64, 300 pretraining steps) is trained on the world of seed 0, then the stored harmful answers
are teacher-forced (:func:`deepalign.analysis.knockout.knockout_ranks_over`). At the words that copy the
answer's own declaration (each step's material, :meth:`SyntheticWorldV2.copied_words`) the model must
rank the correct word first almost always as it is, and far less often when the answer may not read
itself in any layer: the request alone names the item, and an item has 3 valid materials for each place,
so without the declaration the model can at best guess one of three. Calibration, this test's model on a
2-core CPU: 0.925 ranked first without knockout, 0.267 with the knockout in every layer (at every answer
word: 0.959 and 0.493). A world in which the declared material were fixed per item (a world without a choice
to copy) fails this test: the item in the request then gives the material, knockout or not.

The full-size base model (4 layers, width 128, 3000 steps) depends on its answer in the layers after
the first as well; that is a benchmark (``python -m benchmarks.world_v2_probe``), too slow for a test.
"""

from __future__ import annotations

from deepalign.analysis.attention import load_bridge
from deepalign.analysis.knockout import knockout_ranks_over
from deepalign.experiments.corpus import world_corpus
from deepalign.experiments.demo import DemoSettings
from deepalign.experiments.stages import run_stages
from deepalign.data.synthetic import SyntheticWorld


def test_world_v2_answers_copy_their_declaration_through_attention(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    settings = DemoSettings(quick=True, world="v2", progress=False).stage_settings(0)
    run_stages(tmp_path, settings, stages=("base",))
    world = SyntheticWorld.load(tmp_path)
    corpus = world_corpus(world)
    copied = corpus.copied_mask()
    assert int(copied.sum()) == 12 * len(corpus.pairs)  # every step's material, 12 steps an answer
    bridge = load_bridge(tmp_path / "base" / "final")
    alternatives = corpus.alternative_ids(bridge.tokenizer)
    plain = knockout_ranks_over(bridge, corpus.pairs, (), alternatives)
    blocked = knockout_ranks_over(bridge, corpus.pairs, range(bridge.cfg.n_layers), alternatives)
    first_plain = float((plain[copied] == 0).float().mean())
    first_blocked = float((blocked[copied] == 0).float().mean())
    assert first_plain >= 0.8, f"the quick base model copies only {first_plain:.3f} of the declared materials"
    assert first_blocked <= 0.5, f"{first_blocked:.3f} of the copied materials ranked first without reading the answer"
    assert first_plain - first_blocked >= 0.3
