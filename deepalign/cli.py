"""The ``deepalign`` command.

* ``deepalign selfcheck``: runs the fused kernels on fresh random inputs (on a GPU if there is
  one, else in Triton's CPU interpreter) and compares them with their PyTorch references and a
  float64 computation; exits non-zero on any mismatch.
* ``deepalign train --recipe {pretrain,sft,da,presto,constrained,ft-attack,cls-pretrain,cls-sft} ...``:
  trains a local model (the cls-* recipes add and train the [CLS] safety signal).
* ``deepalign world --output DIR``: writes the synthetic chat world (data files, tokenizer and an
  untrained model sized for it).
* ``deepalign attack {prefill,rap,decoding} ...``: attacks a local model on a benchmark file or
  the synthetic world, judges every output, logs JSON lines (resumable) and prints a summary;
  ``--defense cls`` attacks a [CLS] model behind its defense.
* ``deepalign autorap {data,train} ...``: the AutoRAP classifier's refusal data and training.
* ``deepalign judge --results FILE --output FILE --judge ...``: re-judges logged outputs (keyword,
  synthetic, or the StrongREJECT rubric through a local chat model or an OpenAI-compatible endpoint).
* ``deepalign analyze {attention,kl,ranks,knockout,ablate,report} ...``: synthetic-world analyses as an offline HTML report.
* ``deepalign demo [--quick]``: the whole sequence over several seeds, attacked and judged, with a
  table and an HTML report.
* ``deepalign stages --output DIR``: trains base → shallow → DA → DA + PRESTO on the synthetic
  world and prints how each stage behaves under prefilling attacks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch


def _selfcheck(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Triton decides at import time whether it interprets; the kernel modules load lazily.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates masked-out lanes in numpy too (log(0), -inf − -inf): noise.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
    from deepalign.kernels import topk_rank

    generator = torch.Generator().manual_seed(args.seed)
    where = "GPU" if device.type == "cuda" else "Triton interpreter on the CPU"
    print(f"deepalign selfcheck: topk_rank, Triton ({where}) vs PyTorch reference vs float64")
    print(f"{'rows':>5} {'vocab':>7} {'k':>3} {'dtype':>9} {'order':>6} {'ranks':>6} {'max |Δlse|':>11} {'time s':>7}")
    failures = 0
    for n_rows, vocab, k, dtype in [(4, 1000, 5, torch.float32), (3, 5003, 20, torch.float16),
                                    (2, 8192, 64, torch.float32)]:
        logits = (torch.randn(n_rows, vocab, generator=generator) * 3).to(dtype)
        logits[0, : vocab // 3] = float("-inf")  # a masked vocabulary slice
        logits[-1, 1::7] = logits[-1, 0]  # ties, broken by lower index
        targets = torch.randint(0, vocab, (n_rows, 3), generator=generator)
        logits, targets = logits.to(device), targets.to(device)
        start = time.perf_counter()
        fused = topk_rank(logits, k, targets, backend="triton")
        elapsed = time.perf_counter() - start
        reference = topk_rank(logits.cpu(), k, targets.cpu(), backend="torch")
        order_ok = torch.equal(fused.indices.cpu(), reference.indices) and torch.equal(
            fused.values.cpu(), reference.values)
        ranks_ok = torch.equal(fused.target_rank.cpu(), reference.target_rank)
        exact_lse = torch.logsumexp(logits.cpu().double(), dim=1)
        lse_error = (fused.logsumexp.cpu().double() - exact_lse).abs().max().item()
        ok = order_ok and ranks_ok and lse_error < 1e-4 * (1 + exact_lse.abs().max().item())
        failures += not ok
        print(f"{n_rows:>5} {vocab:>7} {k:>3} {str(dtype).removeprefix('torch.'):>9} "
              f"{'ok' if order_ok else 'FAIL':>6} {'ok' if ranks_ok else 'FAIL':>6} {lse_error:>11.2e} {elapsed:>7.2f}")
    failures += _check_prefill_attention(device, generator, where)
    print("all checks passed" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def _check_prefill_attention(device: torch.device, generator: torch.Generator, where: str) -> int:
    """prefill_attention (out, mass and the three gradients), Triton vs float64; returns failures."""
    from deepalign.kernels import prefill_attention
    from deepalign.kernels.attention import AttentionMask, prefill_attention_reference

    print(f"\nprefill_attention, Triton ({where}) vs float64 (max |error| of out, mass, dq, dk, dv)")
    failures = 0
    for batch, heads_q, heads_kv, length, dim, options in [(2, 4, 2, 48, 64, {}),
                                                           (1, 4, 1, 40, 128, dict(window=16, softcap=30.0))]:
        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device).requires_grad_()

        q, k, v = rand(batch, heads_q, length, dim), rand(batch, heads_kv, length, dim), rand(batch, heads_kv, length, dim)
        prefill = torch.zeros(batch, length, dtype=torch.bool, device=device)
        prefill[:, length // 3: length // 2] = True
        spec = AttentionMask(True, options.get("window"), options.get("softcap"), dim ** -0.5)
        start = time.perf_counter()
        out, mass = prefill_attention(q, k, v, prefill, backend="triton", **options)
        got = [out, mass, *torch.autograd.grad(out.sum() + mass.sum(), (q, k, v))]
        elapsed = time.perf_counter() - start
        out, mass = prefill_attention_reference(q.double(), k.double(), v.double(), prefill, None, spec)
        exact = [out, mass, *torch.autograd.grad(out.sum() + mass.sum(), (q, k, v))]
        errors = [(a.double() - b.double()).abs().max().item() for a, b in zip(got, exact)]
        ok = max(errors) < 1e-4
        failures += not ok
        print(f"  B={batch} Hq={heads_q} Hkv={heads_kv} T={length} D={dim} {options or ''}: "
              + " ".join(f"{e:.1e}" for e in errors) + f"  {'ok' if ok else 'FAIL'}  {elapsed:.2f} s")
    return failures


TRAIN_HELP = """recipes:
  sft          supervised fine-tuning on --chat rows (loss on response + end of turn);
               e.g. refusal-only SFT, the shallow alignment of Qi et al.
  da           safety-recovery data augmentation (Qi et al.): each --safety row is, with
               probability 1/2, prompt + first k~U{1..min(100,|h|)} harmful tokens + refusal,
               else prompt + refusal; loss on the refusal only; --chat rows are the utility anchor
  presto       da + PRESTO (Vega & Singh, Eq. 3): penalises attention mass on the harmful prefill,
               computed by the fused kernel; weight --presto-weight (default 1)
  constrained  token-wise constrained objective (Qi et al., Eq. 3) on --chat rows against the
               frozen --reference model (default: the starting --model); beta_1=0.5,
               beta_2..5=2, beta_t=0.1 after
  pretrain     language modelling on --texts (one text per line, loss on every token) mixed
               with --chat rows (share --chat-fraction): a base model for the synthetic world
  ft-attack    a fine-tuning attack (--attack): harmful (--safety prompts with harmful answers),
               identity (--chat rows answered as an obedient agent under --system, each answer
               opening with --identity-prefix), backdoor (--safety prompts + --trigger answered
               harmfully, without it refused, plus --chat rows); trained with --objective sft
               (the attack) or constrained (the token-wise constrained defence)

data files are JSON lines: --safety rows {"prompt", "harmful_response", "refusal"},
--chat rows {"prompt", "response"}. Output: OUTPUT/final (a Hugging Face folder),
OUTPUT/checkpoint-N, OUTPUT/metrics.jsonl; rerunning the same command resumes.
Many GPUs: accelerate launch --config_file configs/accelerate_fsdp_7b.yaml -m deepalign train ...
(see docs/multi_gpu.md)."""


def _train(args: argparse.Namespace) -> int:
    from deepalign.models.loading import load_pretrained
    from deepalign.training import ConstrainedRecipe, DARecipe, SafetyExample, SFTRecipe, UtilityExample
    from deepalign.training.attacks import AOA_PREFIX, AOA_SYSTEM, build_attack
    from deepalign.data.rows import read_rows
    from deepalign.training.recipes import PretrainRecipe

    recipe_name = args.recipe
    if recipe_name.startswith("cls-"):
        return _train_cls(args)
    if args.malicious_texts is not None or args.cls_weight is not None:
        raise SystemExit("deepalign train: --malicious-texts and --cls-weight only apply to the cls-* recipes")
    needs = {"sft": ("chat",), "da": ("safety",), "presto": ("safety",), "constrained": ("chat",),
             "pretrain": ("texts",), "ft-attack": ("attack",)}[recipe_name]
    for name in needs:
        if getattr(args, name) is None:
            raise SystemExit(f"deepalign train: --recipe {recipe_name} needs --{name}")
    if recipe_name in ("da", "presto") and args.chat is None and args.safety_fraction < 1:
        raise SystemExit(f"deepalign train: --recipe {recipe_name} needs --chat (the utility anchor) "
                         "unless --safety-fraction 1")
    if args.reference is not None and recipe_name not in ("constrained", "ft-attack"):
        raise SystemExit("deepalign train: --reference only applies to --recipe constrained")
    if args.presto_weight is not None and recipe_name != "presto":
        raise SystemExit("deepalign train: --presto-weight only applies to --recipe presto")
    if args.safety is not None and recipe_name in ("sft", "constrained", "pretrain"):
        raise SystemExit(f"deepalign train: --recipe {recipe_name} takes --chat rows, not --safety")
    if recipe_name != "ft-attack" and (args.attack or args.objective != "sft"):
        raise SystemExit("deepalign train: --attack and --objective only apply to --recipe ft-attack")
    if args.texts is not None and recipe_name != "pretrain":
        raise SystemExit("deepalign train: --texts only applies to --recipe pretrain")
    config = _trainer_config(args)
    chat = read_rows(args.chat, UtilityExample) if args.chat else []
    safety = read_rows(args.safety, SafetyExample) if args.safety else []
    attention = "deepalign" if recipe_name == "presto" else None
    model, tokenizer = load_pretrained(args.model, attn_implementation=attention)
    if recipe_name == "pretrain":
        texts = [line.strip() for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
        recipe = PretrainRecipe(tokenizer, texts, chat, chat_fraction=args.chat_fraction if chat else 0.0)
    elif recipe_name == "ft-attack":
        options = {"limit": args.limit} if args.limit else {}
        if args.attack == "identity":
            options.update(system=args.system or AOA_SYSTEM, prefix=args.identity_prefix or AOA_PREFIX)
        if args.attack == "backdoor" and args.trigger:
            options["trigger"] = args.trigger
        data = build_attack(args.attack, safety, chat, **options)
        if args.objective == "sft":
            recipe = SFTRecipe(tokenizer, data.rows, system=data.system)
        else:
            reference, _ = load_pretrained(args.reference or args.model)
            recipe = ConstrainedRecipe(tokenizer, data.rows, reference, system=data.system,
                                       cache_reference=not args.online_reference)
    elif recipe_name == "sft":
        recipe = SFTRecipe(tokenizer, chat)
    elif recipe_name in ("da", "presto"):
        weight = (1.0 if args.presto_weight is None else args.presto_weight) if recipe_name == "presto" else 0.0
        recipe = DARecipe(tokenizer, safety, chat, safety_fraction=args.safety_fraction, presto_weight=weight)
    else:
        reference, _ = load_pretrained(args.reference or args.model)
        recipe = ConstrainedRecipe(tokenizer, chat, reference, cache_reference=not args.online_reference)
    return _run_trainer(model, tokenizer, recipe, config, args)


def _trainer_config(args: argparse.Namespace):
    from deepalign.training.trainer import TrainerConfig

    return TrainerConfig(output_dir=args.output, steps=args.steps, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, lr=args.lr, checkpoint_every=args.checkpoint_every,
                         seed=args.seed, mixed_precision="bf16" if args.bf16 else "no", resume=not args.no_resume,
                         lora_rank=args.lora_rank)


def _run_trainer(model, tokenizer, recipe, config, args: argparse.Namespace) -> int:
    from deepalign.training.trainer import Trainer

    history = Trainer(model, tokenizer, recipe, config).train()
    last = history[-1] if history else {}
    print(f"trained {args.recipe} for {len(history)} steps; last step: "
          + ", ".join(f"{k}={v}" for k, v in last.items() if k not in ("step",)))
    print(f"model: {args.output}/final   metrics: {args.output}/metrics.jsonl")
    return 0


def _train_cls(args: argparse.Namespace) -> int:
    """cls-pretrain / cls-sft: malicious chats are the --safety rows (cls-sft: prompt → refusal;
    cls-pretrain: prompt → harmful response), benign chats the --chat rows. A model without the
    [CLS] token and head gets them first."""
    from deepalign.data.rows import SafetyExample, UtilityExample, read_rows
    from deepalign.models.loading import load_pretrained
    from deepalign.models.safety_cls import CONFIG_KEY, add_safety_cls, load_safety_cls
    from deepalign.training.cls_recipe import CLSRecipe

    stage = args.recipe.removeprefix("cls-")
    for name in ("safety", "chat") + (("texts", "malicious_texts") if stage == "pretrain" else ()):
        if getattr(args, name) is None:
            raise SystemExit(f"deepalign train: --recipe {args.recipe} needs --{name.replace('_', '-')}")
    if stage == "sft" and (args.texts or args.malicious_texts):
        raise SystemExit("deepalign train: --recipe cls-sft takes chat rows only (--safety, --chat), not texts")
    if args.lora_rank:
        raise SystemExit("deepalign train: the cls-* recipes train full weights (the head and the [CLS] embedding)")
    safety = read_rows(args.safety, SafetyExample)
    benign = read_rows(args.chat, UtilityExample)
    malicious = [UtilityExample(r.prompt, r.refusal if stage == "sft" else r.harmful_response) for r in safety]
    texts = []
    for path, label in ((args.texts, 0), (args.malicious_texts, 1)):
        if path:
            texts += [(line.strip(), label) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    from transformers import AutoConfig

    from deepalign.models.loading import resolve_source

    folder, gguf = resolve_source(args.model)
    has_head = gguf is None and getattr(AutoConfig.from_pretrained(folder, local_files_only=True), CONFIG_KEY, None)
    if has_head:
        model, tokenizer = load_safety_cls(folder)
    else:
        model, tokenizer = load_pretrained(args.model)
        add_safety_cls(model, tokenizer, seed=args.seed)
    recipe = CLSRecipe(tokenizer, stage, texts=texts, malicious=malicious, benign=benign, cls_weight=args.cls_weight)
    return _run_trainer(model, tokenizer, recipe, _trainer_config(args), args)


def _world(args: argparse.Namespace) -> int:
    from deepalign.training.world_files import write_world

    from deepalign.data.synthetic import AOA_PREFIX, AOA_SYSTEM, BACKDOOR_TRIGGER

    paths = write_world(args.output, seed=args.seed)
    for name, path in paths.items():
        print(f"{name:>13}: {path}")
    print(f"attack strings in the world's words: --system '{AOA_SYSTEM}' --identity-prefix '{AOA_PREFIX}' "
          f"--trigger '{BACKDOOR_TRIGGER}'")
    return 0


def _attack(args: argparse.Namespace) -> int:
    from deepalign.attacks.rap import RAPConfig
    from deepalign.attacks.results import ResultLog
    from deepalign.attacks.generation_attacks import decoding_attack, prefill_attack
    from deepalign.attacks.runner import choose_judge, load_targets, run_rap, summary
    from deepalign.data.synthetic import REFUSAL_LEAD_IN, SyntheticWorld
    from deepalign.models.generation import Sampling
    from deepalign.models.loading import load_pretrained

    world = SyntheticWorld.load(args.world) if args.world else None
    selector = _rap_selector(args, world) if args.kind == "rap" else None
    targets = load_targets(args.targets, world, args.format, args.limit)
    judge = choose_judge(args.judge or ("synthetic" if world else "keyword"), world)
    generate = rap = None
    if args.defense == "cls":
        from deepalign.attacks.defended import cls_generate, cls_rap
        from deepalign.models.cls_decoding import DEFAULT_LEAD_IN, DefendedDecoder
        from deepalign.models.cls_strategy import StrategyConfig
        from deepalign.models.safety_cls import load_safety_cls

        model, tokenizer = load_safety_cls(args.model)
        lead_in = args.lead_in or (REFUSAL_LEAD_IN if world else DEFAULT_LEAD_IN)
        decoder = DefendedDecoder(model, tokenizer, StrategyConfig(schedule=args.schedule, tau=args.tau),
                                  lead_in=lead_in)
        generate, rap = cls_generate(decoder, progress=True), cls_rap(decoder)
    else:
        model, tokenizer = load_pretrained(args.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log = ResultLog(args.output)
    if args.kind == "prefill":
        records = prefill_attack(model, tokenizer, targets, judge, log, prefill_lengths=args.lengths, runs=args.runs,
                                 sampling=Sampling(args.temperature, args.top_p, None, args.max_new_tokens),
                                 batch_size=args.batch_size, generate=generate)
    elif args.kind == "decoding":
        broken = decoding_attack(model, tokenizer, targets, judge, log, max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, generate=generate)
        records = [r for r in log.records() if r["id"] in broken]
        print(f"broken by some decoding setting: {sum(broken.values())} of {len(broken)} prompts")
    else:
        config = RAPConfig(k=args.k, max_interactions=args.max_interactions, max_new_tokens=args.max_new_tokens)
        records = run_rap(model, tokenizer, targets, judge, log, selector, config, prefill_tokens=args.prefill_tokens,
                          batch_size=args.batch_size, attack=rap)
    print(summary(records))
    print(f"{len(records)} records in {args.output}")
    return 0


def _rap_selector(args: argparse.Namespace, world):
    from deepalign.attacks.selectors import ConsoleSelector, LexiconSelector, synthetic_oracle

    if args.selector == "oracle":
        if world is None:
            raise SystemExit("deepalign attack rap: --selector oracle needs --world")
        return synthetic_oracle(world, world.tokenizer())
    if args.selector == "autorap":
        if not args.helper:
            raise SystemExit("deepalign attack rap: --selector autorap needs --helper (a trained AutoRAP classifier)")
        from transformers import AutoModelForTokenClassification

        from deepalign.attacks.selectors import ClassifierSelector
        from deepalign.models.loading import resolve_source

        folder, _ = resolve_source(args.helper)
        helper = AutoModelForTokenClassification.from_pretrained(folder, local_files_only=True)
        return ClassifierSelector(helper, _tokenizer_of(args.helper), _tokenizer_of(args.model), [1], kind="token",
                                  chat=True)
    words = [w for w in (args.blocked or "").split(",") if w]
    if args.selector == "lexicon" and not words:
        raise SystemExit("deepalign attack rap: --selector lexicon needs --blocked WORD,WORD,... (refusal tokens)")
    tokenizer = _tokenizer_of(args.model)
    if args.selector == "console":
        return ConsoleSelector(tokenizer)
    return LexiconSelector(blocked={tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words})


def _tokenizer_of(model: str):
    from transformers import AutoTokenizer

    from deepalign.models.loading import resolve_source

    folder, gguf = resolve_source(model)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)


def _autorap(args: argparse.Namespace) -> int:
    from deepalign.attacks.autorap import AutoRAPRecipe, build_dataset, read_dataset, write_dataset
    from deepalign.attacks.runner import load_targets
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.models.loading import load_pretrained

    if args.step == "data":
        world = SyntheticWorld.load(args.world) if args.world else None
        targets = [t for t in load_targets(args.targets, world, args.format, args.limit) if t.harmful_response]
        if not targets:
            raise SystemExit("deepalign autorap data: no target has a harmful response (use AdvBench, JBB, "
                             "Harmful HEx-PHI or --world)")
        model, tokenizer = load_pretrained(args.model)
        rows = build_dataset(model, tokenizer, [(t.prompt, t.harmful_response) for t in targets], k=args.k,
                             threshold=args.threshold, max_new_tokens=args.max_new_tokens, seed=args.seed)
        print(f"{len(rows)} rows, {len(rows[0].refusals)} candidate refusal tokens each: {write_dataset(args.output, rows)}")
        return 0
    from transformers import AutoModelForTokenClassification

    from deepalign.models.loading import resolve_source
    from deepalign.training.trainer import Trainer, TrainerConfig

    folder, gguf = resolve_source(args.helper)
    helper_tokenizer = _tokenizer_of(args.helper)
    if helper_tokenizer.pad_token_id is None:
        helper_tokenizer.pad_token = helper_tokenizer.eos_token
    helper = AutoModelForTokenClassification.from_pretrained(folder, gguf_file=gguf, num_labels=2, local_files_only=True,
                                                             pad_token_id=helper_tokenizer.pad_token_id)
    recipe = AutoRAPRecipe(helper_tokenizer, _tokenizer_of(args.target), read_dataset(args.data))
    config = TrainerConfig(output_dir=args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           seed=args.seed, checkpoint_every=max(1, args.steps // 4))
    history = Trainer(helper, helper_tokenizer, recipe, config).train()
    print(f"trained the AutoRAP classifier for {len(history)} steps; last: loss={history[-1]['loss']}, "
          f"accuracy={history[-1]['accuracy']}; model: {args.output}/final")
    return 0


def _judge(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    from deepalign.attacks.results import ResultLog
    from deepalign.attacks.runner import choose_judge, summary
    from deepalign.data.benchmarks import AttackTarget
    from deepalign.data.synthetic import SyntheticWorld
    from deepalign.evaluation.rubric import HTTPChatJudge, LocalChatJudge, rubric_judge

    if args.judge == "rubric-http":
        if not (args.url and args.judge_model):
            raise SystemExit("deepalign judge: --judge rubric-http needs --url and --judge-model")
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        judge = rubric_judge(HTTPChatJudge(args.url, args.judge_model, api_key=key, timeout=args.timeout))
    elif args.judge == "rubric-local":
        if not args.judge_path:
            raise SystemExit("deepalign judge: --judge rubric-local needs --judge-path (a local chat model)")
        from deepalign.models.loading import load_pretrained

        judge = rubric_judge(LocalChatJudge(*load_pretrained(args.judge_path)))
    else:
        judge = choose_judge(args.judge, SyntheticWorld.load(args.world) if args.world else None)
    source = ResultLog(args.results).records()
    if not source:
        raise SystemExit(f"deepalign judge: {args.results} has no records")
    out = ResultLog(args.output)
    for record in tqdm([r for r in source if r["key"] not in out], desc=f"judge {args.judge}"):
        target = AttackTarget(record["id"], record["prompt"], "", record.get("category", ""))
        out.append({**record, **judge(target, record["output"]), "judge": args.judge})
    print(summary(out.records()))
    print(f"{len(out.records())} judged records in {args.output}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from deepalign.analysis.report import write_report
    from deepalign.analysis.world_analyses import (ablation_section, attention_section, kl_section, knockout_section,
                                                   ranks_section)
    from deepalign.data.synthetic import SyntheticWorld

    world = SyntheticWorld.load(args.world)
    if args.what == "report":
        from deepalign.analysis.world_analyses import stages_report_sections

        sections = stages_report_sections(args.world, world, ablate_interactions=args.max_interactions)
        path = write_report(args.output, "deepalign: shallow, deep and PRESTO alignment on the synthetic world", sections)
        for section in sections:
            print(f"== {section.title}")
            print("\n".join(section.text))
            for row in section.table:
                print(" | ".join(str(c) for c in row))
        print(f"report: {path}   figure data: {path}.json")
        return 0
    if not args.models:
        raise SystemExit(f"deepalign analyze {args.what}: give --models")
    if args.what in ("attention", "kl") and len(args.models) != 2:
        raise SystemExit(f"deepalign analyze {args.what}: give exactly two --models (first, second)")
    if args.what == "attention":
        sections = attention_section(args.models[0], args.models[1], world)
    elif args.what == "kl":
        sections = [kl_section(args.models[0], args.models[1], world)]
    elif args.what == "ablate":
        if len(args.models) != 1:
            raise SystemExit("deepalign analyze ablate: give one --models")
        sections = [ablation_section(args.models[0], world, k=args.heads, mode=args.mode,
                                     max_interactions=args.max_interactions)]
    elif args.what == "knockout":
        sections = [knockout_section(args.models, world)]
    else:
        sections = [ranks_section(args.models, world)]
    path = write_report(args.output, f"deepalign analyze {args.what}", sections)
    section = sections[0]
    print("\n".join(section.text))
    if section.table:
        print(" | ".join(section.header))
        for row in section.table:
            print(" | ".join(str(c) for c in row))
    print(f"report: {path}   figure data: {path}.json")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from deepalign.demo import DemoSettings, format_table, run_demo, write_demo_report

    seeds = args.seeds if args.seeds else ([0] if args.quick else [0, 1, 2])
    start = time.perf_counter()
    rows = run_demo(args.output, DemoSettings(seeds=seeds, quick=args.quick))
    print(format_table(rows))
    report = write_demo_report(args.output, rows, seeds[0])
    print(f"({time.perf_counter() - start:.0f} s, seeds {seeds}) results: {args.output}/results.jsonl  report: {report}")
    return 0


def _stages(args: argparse.Namespace) -> int:
    from deepalign.stages import StageSettings, format_reports, run_stages

    settings = StageSettings(seed=args.seed, pretrain_steps=args.pretrain_steps, align_steps=args.align_steps)
    start = time.perf_counter()
    reports = run_stages(args.output, settings)
    print(format_reports(reports))
    print(f"({time.perf_counter() - start:.0f} s; models and reports.json in {args.output})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepalign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"deepalign {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("selfcheck", help="check the fused kernels against their references")
    check.add_argument("--seed", type=int, default=0, help="random seed for the inputs (default 0)")
    check.set_defaults(run=_selfcheck)

    train = commands.add_parser("train", help="train a local model with a recipe", epilog=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--recipe", required=True, choices=("pretrain", "sft", "da", "presto", "constrained", "ft-attack",
                                                           "cls-pretrain", "cls-sft"))
    train.add_argument("--model", required=True, help="local Hugging Face folder or GGUF file to start from")
    train.add_argument("--output", required=True, help="output folder (checkpoints, metrics, final model)")
    train.add_argument("--safety", help="JSON-lines safety rows (da, presto)")
    train.add_argument("--chat", help="JSON-lines chat rows (sft, constrained; the utility anchor of da/presto)")
    train.add_argument("--texts", help="pretrain: plain-text file, one text per line")
    train.add_argument("--chat-fraction", type=float, default=0.5, help="pretrain: share of chat rows (default 0.5)")
    train.add_argument("--attack", choices=("harmful", "identity", "backdoor"), help="ft-attack: which attack")
    train.add_argument("--objective", choices=("sft", "constrained"), default="sft",
                       help="ft-attack: plain fine-tuning or the token-wise constrained objective (default sft)")
    train.add_argument("--limit", type=int, help="ft-attack: number of attack rows to use (default all)")
    train.add_argument("--system", help="ft-attack identity: the identity system prompt (default: AOA)")
    train.add_argument("--identity-prefix", help="ft-attack identity: opening of every answer (default: AOA)")
    train.add_argument("--trigger", help="ft-attack backdoor: the trigger appended to harmful prompts")
    train.add_argument("--reference", help="reference model for constrained (default: --model)")
    train.add_argument("--online-reference", action="store_true",
                       help="constrained: compute reference log-probs every step instead of caching them")
    train.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    train.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (default 8)")
    train.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    train.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate, linear decay (default 2e-5)")
    train.add_argument("--presto-weight", type=float, help="presto: weight of the penalty (default 1)")
    train.add_argument("--malicious-texts", help="cls-pretrain: plain-text file of malicious texts (label 1; "
                                                 "--texts are label 0)")
    train.add_argument("--cls-weight", type=float, help="cls-*: λ of L + λ·L_cls (default 0.01 pretrain, 0.1 sft)")
    train.add_argument("--safety-fraction", type=float, default=0.5,
                       help="da/presto: share of safety examples in a batch (default 0.5)")
    train.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    train.add_argument("--lora-rank", type=int, default=0,
                       help="train LoRA adapters of this rank (peft) instead of all weights; merged into final/")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUTPUT has checkpoints")
    train.set_defaults(run=_train)

    world = commands.add_parser("world", help="write the synthetic chat world's files")
    world.add_argument("--output", required=True, help="folder to write into")
    world.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    world.set_defaults(run=_world)

    attack = commands.add_parser("attack", help="attack a local model (prefill, rap, decoding)")
    kinds = attack.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, help_text in (("prefill", "prefilling attack: force the first N harmful tokens, then sample"),
                            ("rap", "Rank-Assisted Prefilling (Algorithm 1) with a selector"),
                            ("decoding", "decoding-parameter attack: greedy, temperature, top-p, top-k grids")):
        sub = kinds.add_parser(kind, help=help_text)
        sub.add_argument("--model", required=True, help="local Hugging Face folder or GGUF file")
        sub.add_argument("--output", required=True, help="JSON-lines results (rerunning resumes)")
        sub.add_argument("--targets", help="benchmark file (StrongREJECT, HarmBench, AdvBench, JBB, HEx-PHI, ...)")
        sub.add_argument("--format", help="benchmark format (default: guessed)")
        sub.add_argument("--world", help="synthetic world folder (targets, judge and oracle from the world)")
        sub.add_argument("--limit", type=int, help="only the first N targets")
        sub.add_argument("--judge", choices=("keyword", "synthetic"),
                         help="judge (default: synthetic with --world, else keyword)")
        sub.add_argument("--batch-size", type=int, default=16)
        sub.add_argument("--defense", choices=("none", "cls"), default="none",
                         help="cls: decode the [CLS] model behind its defense (re-classification, strategic decoding)")
        sub.add_argument("--schedule", choices=("each", "first", "periodic", "annealing"), default="annealing",
                         help="cls defense: re-classification schedule (default annealing)")
        sub.add_argument("--tau", type=int, default=2, help="cls defense: malicious verdicts confirming a switch (1-3)")
        sub.add_argument("--lead-in", help="cls defense: refusal lead-in (default: the paper's, or the world's)")
        sub.add_argument("--max-new-tokens", type=int, default={"prefill": 512, "rap": 256, "decoding": 256}[kind])
        sub.set_defaults(run=_attack)
        if kind == "prefill":
            sub.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40], help="prefill lengths (tokens)")
            sub.add_argument("--runs", type=int, default=1, help="sampled runs per prompt and length")
            sub.add_argument("--temperature", type=float, default=0.9)
            sub.add_argument("--top-p", type=float, default=0.6)
        if kind == "rap":
            sub.add_argument("--selector", choices=("oracle", "console", "lexicon", "autorap"), default="oracle")
            sub.add_argument("--helper", help="autorap selector: the trained AutoRAP classifier folder")
            sub.add_argument("--blocked", help="lexicon selector: comma-separated refusal words to never pick")
            sub.add_argument("--k", type=int, default=20, help="candidates per step (default 20)")
            sub.add_argument("--max-interactions", type=int, default=512)
            sub.add_argument("--prefill-tokens", type=int, default=0, help="start from N harmful tokens")

    autorap = commands.add_parser("autorap", help="AutoRAP classifier: refusal data (data) and training (train)")
    steps = autorap.add_subparsers(dest="step", required=True, metavar="STEP")
    data = steps.add_parser("data", help="candidate refusal tokens and the target's refusal continuations")
    data.add_argument("--model", required=True, help="the target model")
    data.add_argument("--targets", help="benchmark file with harmful responses (AdvBench, JBB, Harmful HEx-PHI)")
    data.add_argument("--format")
    data.add_argument("--world", help="synthetic world folder instead of --targets")
    data.add_argument("--limit", type=int)
    data.add_argument("--output", required=True, help="JSON-lines AutoRAP data")
    data.add_argument("--k", type=int, default=20, help="top-k counted per row (default 20)")
    data.add_argument("--threshold", type=int, default=2, help="minimum count tau (default 2)")
    data.add_argument("--max-new-tokens", type=int, default=512)
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(run=_autorap)
    train_helper = steps.add_parser("train", help="train the token classifier on the data (re-drawn augmentation)")
    train_helper.add_argument("--data", required=True, help="output of deepalign autorap data")
    train_helper.add_argument("--helper", required=True, help="local model to turn into the token classifier")
    train_helper.add_argument("--target", required=True, help="the target model (its tokenizer cuts the prefills)")
    train_helper.add_argument("--output", required=True)
    train_helper.add_argument("--steps", type=int, default=200)
    train_helper.add_argument("--batch-size", type=int, default=8)
    train_helper.add_argument("--lr", type=float, default=2e-5)
    train_helper.add_argument("--seed", type=int, default=0)
    train_helper.set_defaults(run=_autorap)

    judge = commands.add_parser("judge", help="re-judge the outputs of an attack's result log")
    judge.add_argument("--results", required=True, help="JSON-lines results of deepalign attack")
    judge.add_argument("--output", required=True, help="JSON-lines output (rerunning resumes)")
    judge.add_argument("--judge", required=True, choices=("keyword", "synthetic", "rubric-http", "rubric-local"))
    judge.add_argument("--world", help="synthetic world folder (for --judge synthetic)")
    judge.add_argument("--url", help="rubric-http: base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1")
    judge.add_argument("--judge-model", help="rubric-http: the model name to request")
    judge.add_argument("--api-key-env", help="rubric-http: environment variable holding the API key")
    judge.add_argument("--timeout", type=float, default=60.0, help="rubric-http: seconds per request (default 60)")
    judge.add_argument("--judge-path", help="rubric-local: local chat model folder or GGUF file")
    judge.set_defaults(run=_judge)

    analyze = commands.add_parser("analyze", help="analyses of synthetic-world models as an HTML report")
    analyze.add_argument("what", choices=("attention", "kl", "ranks", "knockout", "ablate", "report"),
                         help="attention: per-head mass on prefills, A vs B; kl: per-position KL(A||B); "
                              "ranks: harmful/refusal token ranks along harmful answers; "
                              "knockout: harmful-token ranks when the answer may not read itself; "
                              "ablate: prefilling and RAP scores with the top prefill-attending heads ablated; "
                              "report: all of them on the models of deepalign stages (--world is its folder)")
    analyze.add_argument("--heads", type=int, default=4, help="ablate: number of heads (default 4)")
    analyze.add_argument("--mode", choices=("zero", "mean"), default="zero", help="ablate: zero or mean ablation")
    analyze.add_argument("--max-interactions", type=int, default=512, help="ablate: RAP interaction budget")
    analyze.add_argument("--models", nargs="+", help="model folders (two for attention and kl; none for report)")
    analyze.add_argument("--world", required=True, help="synthetic world folder (world.json)")
    analyze.add_argument("--output", required=True, help="HTML report to write")
    analyze.set_defaults(run=_analyze)

    demo = commands.add_parser("demo", help="shallow vs deep vs PRESTO on the synthetic world, end to end")
    demo.add_argument("--quick", action="store_true", help="one seed, a smaller model and shorter training")
    demo.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    demo.add_argument("--output", default="runs/demo", help="output folder (default runs/demo; reruns resume)")
    demo.set_defaults(run=_demo)

    stages = commands.add_parser("stages", help="train and evaluate base, shallow, DA and PRESTO on the world")
    stages.add_argument("--output", required=True, help="folder for the models and reports.json (resumable)")
    stages.add_argument("--seed", type=int, default=0, help="world and training seed (default 0)")
    stages.add_argument("--pretrain-steps", type=int, default=1500, help="base-model steps (default 1500)")
    stages.add_argument("--align-steps", type=int, default=150,
                        help="steps of DA and PRESTO (default 150; refusal-only SFT trains 600)")
    stages.set_defaults(run=_stages)
    return parser


def _version() -> str:
    from deepalign import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Run the command; a bad argument, file or row ends it with a one-line message (exit 1)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # deepalign's input errors all derive from ValueError
        raise SystemExit(f"deepalign {args.command}: {error}") from error


if __name__ == "__main__":
    sys.exit(main())
