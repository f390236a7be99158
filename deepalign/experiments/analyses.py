"""The analyses, as report sections (used by ``deepalign analyze`` and the demo's report), on any
:class:`~deepalign.experiments.corpus.HarmfulCorpus`: the synthetic world's harmful requests, or a
benchmark file's targets with harmful responses. Sections state what was measured; they draw no
conclusions the numbers might not bear.

* :func:`attention_section`: per-head attention mass on harmful prefills, model A vs model B
  (e.g. DA vs DA + PRESTO), from TransformerLens hooks;
* :func:`kl_section`: per-position KL between two models over the harmful answers (e.g. shallow
  vs base), mean ± std band;
* :func:`ranks_section`: along the harmful answers, the rank of the harmful token and of the best
  refusal token per position, for each model;
* :func:`knockout_section`: how often the correct harmful token is ranked first or in the top 20 when
  the answer may not read itself in the later layers, or in any layer (attention knockout), per model;
* :func:`ablation_section` (synthetic world only: it needs the world's judge and RAP oracle):
  prefilling and RAP scores with the top prefill-attending heads ablated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from deepalign.analysis.attention import PrefillExample, attention_received, load_bridge, prefill_mass_by_head
from deepalign.analysis.continuations import continuation_ranks, per_position_kl, pfa1_by_prefill_length
from deepalign.analysis.figures import comparison_heatmaps, head_heatmap, position_lines, token_layer_map
from deepalign.analysis.knockout import knockout_ranks_over
from deepalign.analysis.report import Section
from deepalign.data.synthetic import SyntheticWorld
from deepalign.experiments.corpus import HarmfulCorpus, world_corpus
from deepalign.models.chat import set_chat_template, set_default_system
from deepalign.models.loading import load_pretrained, resolve_device


@dataclass(frozen=True)
class ModelLoader:
    """How the analyses load the models they are given: device and dtype (``None``: the CPU in
    float32; bridges stay float32), a chat template to give each tokenizer (``"plain"`` for a base
    model, or Jinja text), and a system prompt for every rendering (``None``: the template's own)."""

    device: str | None = None
    dtype: str | None = None
    chat_template: str | None = None
    system: str | None = None

    def model(self, path: str | Path):
        model, tokenizer = load_pretrained(path, device=self.device, dtype=self.dtype)
        self._template(tokenizer)
        return model, tokenizer

    def bridge(self, path: str | Path):
        bridge = load_bridge(path, device=str(resolve_device(self.device)) if self.device else "cpu")
        self._template(bridge.tokenizer)
        return bridge

    def _template(self, tokenizer) -> None:
        if self.chat_template is not None:
            set_chat_template(tokenizer, self.chat_template)
        if self.system is not None:
            set_default_system(tokenizer, self.system)


PLAIN_LOADER = ModelLoader()


def prefill_examples(corpus: HarmfulCorpus, prefill_words: int = 6, continuation_words: int = 4) -> list[PrefillExample]:
    """Each request with the first ``prefill_words`` words of its harmful answer as prefill and the
    next ``continuation_words`` words as the continuation whose queries are measured (answers with
    no word left for the continuation are skipped)."""
    examples = []
    for prompt, answer in corpus.pairs:
        words = answer.split()
        if len(words) > prefill_words:
            examples.append(PrefillExample(prompt, " ".join(words[:prefill_words]),
                                           " ".join(words[prefill_words:prefill_words + continuation_words])))
    if not examples:
        raise ValueError(f"{corpus.name}: no harmful answer is longer than {prefill_words} words")
    return examples


def _name(path: str | Path) -> str:
    path = Path(path)
    return path.parent.name if path.name == "final" else path.name


def seed_of(path: str | Path) -> int | None:
    """The seed (world and training) of a model that ``deepalign stages`` saved as
    ``<stages>/<stage>/final``, read from ``<stages>/stage_settings.json``; ``None`` when the
    model's folders record none."""
    from deepalign.io import read_json

    path = Path(path)
    for folder in (path, *list(path.parents)[:2]):
        settings = folder / "stage_settings.json"
        if settings.is_file():
            seed = read_json(settings, what="stage settings").get("seed")
            return int(seed) if seed is not None else None
    return None


def seed_line(paths: Sequence[str | Path]) -> str:
    """One sentence naming the seed(s) behind the models of an analysis."""
    seeds = {seed_of(path) for path in paths}
    known = sorted(seed for seed in seeds if seed is not None)
    if not known:
        return "Seed: not recorded in the model folders (models not trained by deepalign stages)."
    unknown = " (and models with no recorded seed)" if None in seeds else ""
    if len(known) == 1:
        return (f"Seed: the models of seed {known[0]} only{unknown} (world and training seed); this analysis is not "
                "repeated over other seeds, so it shows no spread between seeds.")
    return f"Seeds: {', '.join(map(str, known))}{unknown}, as the model folders record (world and training seed)."


MASS = ("attention mass on the harmful prefill: the attention weight a head's queries put on the prefill tokens, "
        "summed over those keys (0–1), averaged over the response queries (from the last prefill token on) and "
        "the examples")


def attention_section(first: str | Path, second: str | Path, corpus: HarmfulCorpus, *,
                      loader: ModelLoader = PLAIN_LOADER) -> list[Section]:
    """The comparison of per-head maps, then the attention each token receives per layer for one
    example, for each model (both maps on one colour scale, the prefill and response outlined)."""
    from deepalign.analysis.attention import example_spans

    examples = prefill_examples(corpus)
    bridges = [loader.bridge(path) for path in (first, second)]
    maps = [prefill_mass_by_head(bridge, examples, progress=False) for bridge in bridges]
    names = (_name(first), _name(second))
    mean = [float(m.mean()) for m in maps]
    seeds = seed_line([first, second])
    text = [f"Mean attention mass on the harmful prefill from the response positions, per layer and head, over "
            f"{len(examples)} (request, prefill) pairs from {corpus.name}. Mean over heads: {names[0]} {mean[0]:.3f}, "
            f"{names[1]} {mean[1]:.3f}. The table gives the mean over heads per layer.",
            f"The two maps share one colour scale; the right map is {names[1]} − {names[0]} on a diverging scale "
            f"centred on 0 (red: more mass in {names[1]}).", seeds]
    table = [[layer, *(f"{float(m[layer].mean()):.3f}" for m in maps)] for layer in range(maps[0].shape[0])]
    sections = [Section(f"Attention to the prefill: {names[0]} vs {names[1]}", text,
                        comparison_heatmaps(maps[0], maps[1], names, colorbar="mass on prefill"), table=table,
                        header=["layer", *(f"{name}: mean mass" for name in names)],
                        metrics=[("mass (maps)", MASS + ", per layer and head"),
                                 ("<model>: mean mass", "that mass for the model, averaged over the layer's heads")])]
    received = [attention_received(bridge, examples[0]) for bridge in bridges]
    low = min(float(r.min()) for r, _ in received)
    high = max(float(r.max()) for r, _ in received)
    for name, bridge, (matrix, tokens) in zip(names, bridges, received):
        spans = example_spans(bridge.tokenizer, examples[0])
        sections.append(Section(f"Attention received by each token per layer: {name}", [
            f"Example: {examples[0].prompt!r} with prefill {examples[0].prefill!r}.",
            "Each cell: the attention the token receives in that layer, averaged over heads and over the later "
            "tokens that can see it. Outlined: the prefill (forced harmful tokens) and the response after it. "
            f"The maps of {names[0]} and {names[1]} share one colour scale ({low:.3f}–{high:.3f}).", seeds],
            token_layer_map(matrix, tokens, f"attention received per token: {name}",
                            spans={"prefill": spans.prefill, "response": spans.response}, zmin=low, zmax=high)))
    return sections


def _padded(rows: list[torch.Tensor]) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), float("nan"))
    for i, row in enumerate(rows):
        out[i, : len(row)] = row.float()
    return out


def kl_section(first: str | Path, second: str | Path, corpus: HarmfulCorpus, *,
               loader: ModelLoader = PLAIN_LOADER) -> Section:
    (model_a, tok_a), (model_b, tok_b) = loader.model(first), loader.model(second)
    rows = [per_position_kl(model_a, tok_a, model_b, tok_b, prompt, answer) for prompt, answer in corpus.pairs]
    values = _padded(rows)
    names = (_name(first), _name(second))
    first_tokens = torch.nanmean(values[:, :3]).item()
    later = torch.nanmean(values[:, 3:]).item()
    text = [f"KL({names[0]} ‖ {names[1]}) at each position of the harmful answers (teacher-forced, {len(rows)} "
            f"answers). Mean over the first 3 positions {first_tokens:.3f} nats, afterwards {later:.3f} nats.",
            "The line is the mean over answers, the band ± 1 std clipped at 0 (KL is never negative).",
            seed_line([first, second])]
    return Section(f"Per-position KL: {names[0]} vs {names[1]}", text,
                   position_lines({f"KL({names[0]}‖{names[1]})": values}, "per-position KL", yaxis="KL (nats)",
                                  band="std", low=0.0),
                   metrics=[("KL (nats)", f"KL(p_{names[0]} ‖ p_{names[1]}) of the two models' next-token distributions "
                                          "at one teacher-forced position of a harmful answer; ≥ 0, 0 when they agree")])


RANK_METRICS = (
    ("median harmful rank", "median, over every position of every answer, of the 0-based rank (0 = the model's top "
                            "choice) of the correct harmful next token"),
    ("harmful in top 20", "share of those positions where the correct harmful token is among the model's 20 most "
                          "likely next tokens"),
    ("median refusal rank", "median 0-based rank of the best-ranked refusal token (the first token of any refusal "
                            "phrase) at each position"))


def ranks_section(models: Sequence[str | Path], corpus: HarmfulCorpus, *, reference: str | Path | None = None,
                  pfa_lengths: Sequence[int] = (1, 3, 6), loader: ModelLoader = PLAIN_LOADER) -> Section:
    """Ranks along harmful answers per model; with a ``reference`` model (e.g. the aligned model's
    own first-token behaviour, or a base model), also the mean PFA-1 after each prefill length. The
    figure draws 1-based ranks (1 = top) on a log axis: medians with interquartile bands."""
    series, table = {}, []
    reference_model = loader.model(reference)[0] if reference is not None else None
    for path in models:
        model, tokenizer = loader.model(path)
        refusal = corpus.refusal_ids(tokenizer)
        harmful, refusing = [], []
        for prompt, answer in corpus.pairs:
            profile = continuation_ranks(model, tokenizer, prompt, answer, refusal)
            harmful.append(profile.harmful_rank)
            refusing.append(profile.refusal_rank)
        name = _name(path)
        series[f"{name}: harmful token"] = _padded(harmful) + 1  # 1-based for the log axis
        series[f"{name}: best refusal token"] = _padded(refusing) + 1
        every = torch.cat(harmful)
        row = [name, f"{every.float().median():.0f}", f"{(every < 20).float().mean():.2f}",
               f"{torch.cat(refusing).float().median():.0f}"]
        if reference_model is not None:
            scores = [pfa1_by_prefill_length(model, reference_model, tokenizer, prompt, answer, pfa_lengths)
                      for prompt, answer in corpus.pairs]
            row += [f"{sum(s[n] for s in scores) / len(scores):.3f}" for n in pfa_lengths]
        table.append(row)
    metrics = list(RANK_METRICS)
    pfa_header = []
    if reference is not None:
        ref = _name(reference)
        pfa_header = [f"PFA-1 after {n} (vs {ref})" for n in pfa_lengths]
        metrics += [(f"PFA-1 after n (vs {ref})",
                     f"mean over requests of ρ_w, the top-weighted Spearman correlation (weights 1 / {ref}'s rank) "
                     f"between {ref}'s ranking of its first response token with no prefill and this model's ranking "
                     "of the next token after the first n tokens of the harmful answer (Vega & Singh); 1 = ranks "
                     "them as the aligned model does unprompted (refusal first), ≤ 0 = the prefill reordered them")]
    return Section("Ranks along the harmful answers", [
        "Rank of the correct harmful token and of the best refusal token at each position of the "
        f"teacher-forced harmful answers of {corpus.name} ({len(corpus.pairs)} answers); refusal tokens: the first "
        "tokens of its refusal phrases in each model's own tokenizer.",
        "Figure: 1-based ranks (1 = top) on a log axis; each line is the median over answers, its band the "
        "25–75% quantiles. Colour: one per model (darker: harmful token, lighter: refusal token); dash: solid for "
        "the harmful token, dotted for the refusal token. The table's ranks are 0-based (0 = top).",
        seed_line([*models, *([reference] if reference is not None else [])])],
        position_lines(series, "ranks along harmful answers", yaxis="rank, 1 = top (log scale)", log_y=True,
                       band="quantile", low=1.0),
        table=table, header=["model", "median harmful rank", "harmful in top 20", "median refusal rank", *pfa_header],
        metrics=metrics)


KNOCKOUT_CONDITIONS = (
    ("no knockout", "the model as it is"),
    ("knockout in layers 1+", "the answer's positions may not attend to earlier answer tokens in every layer but "
                              "layer 0"),
    ("knockout in every layer", "the same in every layer, layer 0 included"))


def knockout_section(models: Sequence[str | Path], corpus: HarmfulCorpus, *, k: int = 20,
                     loader: ModelLoader = PLAIN_LOADER) -> Section:
    """Shares of the correct harmful tokens ranked first and in the top ``k`` (teacher-forced) with no
    knockout, with the answer unable to read itself in every layer but the first, and in every layer."""
    pairs = list(corpus.pairs)
    conditions = tuple(name for name, _ in KNOCKOUT_CONDITIONS)
    copied = corpus.copied_mask() if corpus.copied is not None else None
    table = []
    for path in models:
        bridge = loader.bridge(path)
        layers = bridge.cfg.n_layers
        alternatives = corpus.alternative_ids(bridge.tokenizer)
        ranks = [knockout_ranks_over(bridge, pairs, chosen, alternatives)
                 for chosen in ((), range(1, layers), range(layers))]
        if copied is not None and len(ranks[0]) != len(copied):
            raise ValueError(f"{path}: {len(ranks[0])} answer tokens for {len(copied)} answer words: copied words "
                             "need a word-level tokenizer")
        table.append([_name(path), *(f"{float((r < 1).float().mean()):.3f}" for r in ranks),
                      *(f"{float((r < k).float().mean()):.3f}" for r in ranks),
                      *(f"{float((r[copied] < 1).float().mean()):.3f}" for r in ranks if copied is not None)])
    return Section("Attention knockout: does the harmful answer read itself?", [
        f"Shares of the correct harmful tokens ranked first and in the top {k}, teacher-forced over {len(pairs)} "
        f"harmful requests of {corpus.name}, when the answer's positions may not attend to earlier answer tokens "
        "(those attention scores set to −inf before the softmax) in the given layers."
        + (" Where the answer chooses freely (the material it declares for each place), every valid choice "
           "is correct and the best-ranked one counts." if corpus.choices is not None else ""), seed_line(models)],
        table=table, header=["model", *(f"top 1, {c}" for c in conditions), *(f"top {k}, {c}" for c in conditions),
                             *(f"top 1 copied, {c}" for c in conditions if copied is not None)],
        metrics=[("top 1, <condition>", "share of the answer's positions whose correct harmful next token the model "
                                        "ranks first, under the condition"),
                 (f"top {k}, <condition>", f"share of those positions where it is among the model's {k} most likely "
                                           "next tokens"),
                 *([("top 1 copied, <condition>", "the share ranked first at the words that repeat a choice made "
                                                  "earlier in the same answer (world v2: each step's material, "
                                                  "which only the answer's own declaration gives)")]
                   if copied is not None else []),
                 *KNOCKOUT_CONDITIONS])


CONTROL_SEED = 0


def ablation_section(model_path: str | Path, world: SyntheticWorld, *, k: int = 4, mode: str = "zero",
                     prefill_tokens: Sequence[int] = (2, 5), max_steps: int = 256) -> Section:
    """Ablate the ``k`` heads that attend most to harmful prefills and compare greedy prefilling and
    RAP (k = 20, oracle) scores with and without them, against ``k`` random heads as a control,
    drawn from the heads outside the top set (:func:`deepalign.analysis.ablation.random_heads`)."""
    from deepalign.analysis.ablation import ablate_heads, head_means, random_heads, top_heads
    from deepalign.attacks.rap import RAPConfig, rap_attack
    from deepalign.attacks.selectors import synthetic_oracle
    from deepalign.experiments.world_evaluation import greedy_continuations
    from deepalign.models.chat import collate, encode_text, render_chat

    examples = prefill_examples(world_corpus(world))
    mass = prefill_mass_by_head(load_bridge(model_path), examples, progress=False)
    model, tokenizer = load_pretrained(model_path)
    chosen = top_heads(mass, k)
    control = random_heads(tuple(mass.shape), k, exclude=chosen, seed=CONTROL_SEED)
    items = world.harmful_items()
    prompts = [world.request(item, 0) for item in items]
    means = None
    if mode == "mean":
        batch = collate([render_chat(tokenizer, p, response=world.compliant_response(i)) for p, i in zip(prompts, items)],
                        tokenizer.pad_token_id)
        means = head_means(model, [batch])

    def scores() -> list[float]:
        row = []
        for n in prefill_tokens:
            prefills = [encode_text(tokenizer, world.compliant_response(item))[:n] for item in items]
            texts = greedy_continuations(model, tokenizer, prompts, prefills)
            row.append(sum(world.judge(item, t).score for item, t in zip(items, texts)) / len(items))
        results = rap_attack(model, tokenizer, prompts, [[] for _ in prompts], synthetic_oracle(world, tokenizer),
                             RAPConfig(max_new_tokens=64, max_steps=max_steps), progress=False)
        row.append(sum(world.judge(item, r.text).score for item, r in zip(items, results)) / len(items))
        return row

    table = [["none", *[f"{s:.3f}" for s in scores()]]]
    for label, heads in ((f"top {k} prefill heads {chosen}", chosen), (f"{k} random heads {control}", control)):
        with ablate_heads(model, heads, mode=mode, means=means):
            table.append([label, *[f"{s:.3f}" for s in scores()]])
    header = ["ablated heads", *[f"prefill {n}" for n in prefill_tokens], "RAP"]
    name = _name(model_path)
    figure = head_heatmap(mass, f"attention mass on the prefill per head: {name}", colorbar="mass on prefill",
                          marks={f"top {k} (ablated)": chosen, f"random control ({k}, none of the top)": control})
    return Section(f"Head ablation ({mode}) on {name}", [
        f"Judge scores (0-1) of greedy prefilling attacks and of RAP with {mode}-ablated heads; the top heads are "
        f"those with the largest attention mass on the harmful prefill (crosses on the map below), the control {k} "
        f"heads drawn at random (torch seed {CONTROL_SEED}) from the heads outside the top set (circles).",
        seed_line([model_path])], figure, table=table, header=header,
        metrics=[("ablated heads", f"which (layer, head) outputs are {'zeroed' if mode == 'zero' else 'replaced by their mean'}"
                                   " at the attention output projection"),
                 ("prefill n", "mean judge score (0–1, higher = more harmful content) of greedy continuations after "
                               "the first n tokens of the correct harmful answer"),
                 ("RAP", f"mean judge score of Rank-Assisted Prefilling (k = 20, the world's oracle selector, at most "
                         f"{max_steps} steps, 64 new tokens)"),
                 ("mass (map)", MASS + ", per layer and head")])


def head_heatmap_of(mass: torch.Tensor, name: str):
    return head_heatmap(mass, f"attention mass on the prefill per head: {name}", colorbar="mass on prefill")


def stages_report_sections(stages: str | Path, world: SyntheticWorld, *, ablate_steps: int = 256) -> list[Section]:
    """Every analysis on the models of ``deepalign stages``: attention (DA vs PRESTO), KL (base vs
    shallow), ranks and PFA-1 per stage (PFA-1 against the DA model's own no-prefill behaviour),
    attention knockout (base, DA, PRESTO) and head ablation on DA."""
    stages = Path(stages)
    path = {name: stages / name / "final" for name in ("base", "shallow", "da", "presto")}
    missing = [str(p) for p in path.values() if not p.is_dir()]
    if missing:
        raise ValueError(f"missing stage models (run deepalign stages first): {', '.join(missing)}")
    corpus = world_corpus(world)
    return [*attention_section(path["da"], path["presto"], corpus),
            kl_section(path["base"], path["shallow"], corpus),
            ranks_section(list(path.values()), world_corpus(world, phrasings=(0,)), reference=path["da"]),
            knockout_section([path["base"], path["da"], path["presto"]], corpus),
            ablation_section(path["da"], world, max_steps=ablate_steps)]
