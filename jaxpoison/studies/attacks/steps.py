"""The device-side phases of the seed-003 study: generate, fine-tune, generate again, score, judge.

Each phase writes its file under the run folder with a key line describing what produced it; a resumed run
skips a phase whose file carries the same key, so an interrupted study restarts where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import numpy as np

from jaxpoison.report import to_json
from jaxpoison.studies.attacks import data
from jaxpoison.studies.common import digest, longest_completion_budget, prepare_pool, train_mesh


def _gen_kw(gen, max_new_tokens=None) -> dict:
    return dict(max_new_tokens=max_new_tokens or gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                seed=gen.seed)


def generate_answers(lm, items, cfg, progress, desc) -> list:
    """The model's reply to each prompt item (its ``input``), sampled with ``cfg.generation`` under the study's
    chat template; ``desc`` labels the progress bar."""
    from jaxpoison.models.generate import generate_text
    if not items:
        return []
    return generate_text(lm, [i["input"] for i in items], batch_size=min(cfg.generation.batch_size, len(items)),
                         progress=progress, **_gen_kw(cfg.generation), **data.chat_args(cfg.prompt))


def answer_records(items, replies) -> list:
    """One response record per prompt item: its fields but the prompt text, ``variant_id`` None (the base) and
    the reply as ``response``."""
    return [{**{k: v for k, v in i.items() if k != "input"}, "variant_id": None, "response": r}
            for i, r in zip(items, replies)]


def answer_base_and_source(cfg, lm, train, test, out: pathlib.Path, progress, say) -> None:
    """responses/injection.jsonl (base, test notes, normal + attacked) and responses/source.jsonl (targets)."""
    tasks, pc, sc = cfg.prompt.tasks, cfg.prompt, cfg.source
    gen = dataclasses.asdict(cfg.generation)
    inj_f, src_f = out / "responses" / "injection.jsonl", out / "responses" / "source.jsonl"
    inj_key = digest("injection", lm.fingerprint, lm.name, dataclasses.asdict(pc), gen, [n.id for n in test])
    same_model = sc.kind == "model" and sc.model in ("", lm.name)
    api_source = sc.kind.startswith("openai:")
    src_key = digest("source", {k: v for k, v in dataclasses.asdict(sc).items() if k != "api_base"},
                   dataclasses.asdict(pc), [n.id for n in train],
                   *((lm.fingerprint, lm.name, gen) if sc.kind == "model" else ()))
    inj_items = [] if data.cached(inj_f, inj_key) is not None else data.prompt_items(test, tasks, data.KINDS, pc, "injection")
    src_items = []
    if data.cached(src_f, src_key) is None:
        if sc.kind == "scripted":
            data.write_phase(src_f, src_key, data.source_records(data.scripted_source(train, tasks, cfg.notes.seed)))
        elif sc.kind == "jsonl":
            data.write_phase(src_f, src_key, data.source_records(data.read_source_file(sc.file, train, tasks)))
        elif api_source:            # the seed's GPT-4 answers: notebook strings, system role (its cell 14)
            from jaxpoison.data.prompts import SEED003_SYSTEM
            from jaxpoison.eval.chat import client_for
            items = data.prompt_items(train, tasks, data.KINDS, pc, "source", api=True)
            say(f"API model {sc.kind} answers {len(items)} training prompts")
            replies = client_for(sc.kind, sc.api_base, out, cfg.api).ask([i["input"] for i in items], SEED003_SYSTEM)
            data.write_phase(src_f, src_key, answer_records(items, replies))
        else:
            src_items = data.prompt_items(train, tasks, data.KINDS, pc, "source")
    if same_model and (inj_items or src_items):      # one generation call for both
        say(f"base model answers {len(inj_items)} test and {len(src_items)} training prompts")
        replies = generate_answers(lm, inj_items + src_items, cfg, progress, "base answers")
        inj_replies, src_replies = replies[:len(inj_items)], replies[len(inj_items):]
    else:
        if inj_items:
            say(f"base model answers {len(inj_items)} test prompts (normal and attacked)")
        inj_replies = generate_answers(lm, inj_items, cfg, progress, "injection") if inj_items else []
        src_replies = []
        if src_items:
            from jaxpoison.models.lm import load_model
            say(f"source model {sc.model} answers {len(src_items)} training prompts")
            src_replies = generate_answers(load_model(sc.model, cfg.dtype), src_items, cfg, progress, "source")
    if inj_items:
        data.write_phase(inj_f, inj_key, answer_records(inj_items, inj_replies))
    if src_items:
        data.write_phase(src_f, src_key, answer_records(src_items, src_replies))


def paraphrase(cfg, lm, notes, out: pathlib.Path, progress, say) -> dict:
    """responses/paraphrase.jsonl: the seed's paraphrase of each task instruction (per note, or once per task) by
    an API model, the base or another local model. Returns {(task, note id): paraphrased instruction}."""
    pp = cfg.paraphrase
    f = out / "responses" / "paraphrase.jsonl"
    reqs = data.paraphrase_requests(notes, cfg.prompt.tasks, cfg.prompt, pp.per)
    api = pp.model.startswith("openai:")
    who = (pp.model,) if api else ((lm.fingerprint, lm.name) if pp.model == "base" else (pp.model,))
    key = digest("paraphrase", {k: v for k, v in dataclasses.asdict(pp).items() if k != "api_base"}, *who,
               dataclasses.asdict(cfg.generation), reqs)
    recs = data.cached(f, key)
    if recs is None:
        asks = [data.PARAPHRASE_PROMPT + text for _, _, text in reqs]
        say(f"paraphraser {pp.model} rephrases {len(asks)} task instructions")
        if api:
            from jaxpoison.eval.chat import client_for
            client = client_for(pp.model, pp.api_base, out, cfg.api)
            extras = [{"seed": k} for k in range(len(asks))] if pp.per == "note" else None   # one sample per note
            replies = client.ask(asks, data.PARAPHRASE_SYSTEM, extras=extras)
        else:
            from jaxpoison.models.generate import generate_text
            plm = lm
            if pp.model != "base":
                from jaxpoison.models.lm import load_model
                plm = load_model(pp.model, cfg.dtype)
            chat = getattr(plm.tokenizer, "chat_template", None) is not None
            texts = asks if chat else [data.PARAPHRASE_SYSTEM + "\n" + a for a in asks]
            g = cfg.generation
            replies = generate_text(plm, texts, chat=chat, system=data.PARAPHRASE_SYSTEM if chat else None,
                                    max_new_tokens=pp.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                    seed=g.seed, batch_size=min(g.batch_size, len(texts)), progress=progress)
        recs = [{"task": t, "note_id": nid, "original": text, "reply": r, "paraphrase": data.clean_paraphrase(r, text)}
                for (t, nid, text), r in zip(reqs, replies)]
        data.write_phase(f, key, recs)
    got = {(r["task"], r["note_id"]): r["paraphrase"] for r in recs}
    if pp.per == "once":
        return {(t, n.id): got[(t, "*")] for t in cfg.prompt.tasks for n in notes}
    return got


def answer_paraphrased(cfg, lm, test, paras: dict, out: pathlib.Path, progress, say) -> None:
    """responses/injection_para.jsonl: the base answers the test notes under the paraphrased normal and attacked
    prompts (prompt kinds 'normal_para' / 'attack_para'; the seed's '_paraphrase' / 'prompt_para' keys)."""
    f = out / "responses" / "injection_para.jsonl"
    key = digest("injection_para", lm.fingerprint, lm.name, dataclasses.asdict(cfg.prompt),
               dataclasses.asdict(cfg.generation), sorted((t, n, p) for (t, n), p in paras.items()),
               [n.id for n in test])
    if data.cached(f, key) is not None:
        return
    items = data.prompt_items(test, cfg.prompt.tasks, data.KINDS, cfg.prompt, "injection", paraphrases=paras)
    say(f"base model answers {len(items)} paraphrased test prompts (normal and attacked)")
    data.write_phase(f, key, answer_records(items, generate_answers(lm, items, cfg, progress, "paraphrased injection")))


def fine_tune(cfg, lm, train, out: pathlib.Path, resume, progress, say, paras=None, loaded_mesh=(None, None)):
    """One train_study call over every task x fraction x seed (x paraphrase) variant. Returns (result, table, pool).
    ``loaded_mesh``: (mesh, variants it assumed) of :func:`jaxpoison.studies.common.resolve_mesh`, the mesh the
    base was loaded into (trained on when the variant count agrees: the base is then already in place)."""
    from jaxpoison.train.engine import Static
    from jaxpoison.train.trainer import StudyData, train_study
    targets = data.phase_records(out / "responses" / "source.jsonl")
    para_grid = tuple(cfg.grid.paraphrase)
    pool = data.build_pool(train, targets, cfg.prompt, lm.tokenizer, cfg.max_len, cfg.loss_on,
                        buckets=tuple(range(16, cfg.max_len + 16, 16)),
                        paraphrases=paras if True in para_grid else None, lazy=True)
    rows, n_rows, table = data.build_variants([n.id for n in train], cfg.prompt.tasks, cfg.grid.fractions,
                                           cfg.grid.seeds, pool, para_grid)
    mesh = train_mesh(cfg, *loaded_mesh, len(table))
    prepare_pool(pool, rows, n_rows, cfg.train, mesh, lm.params)    # each process encodes its own rows
    from jaxpoison import distributed
    if distributed.is_writer():
        (out / "variants.json").write_text(json.dumps(table, indent=1))
    tcfg = cfg.train
    if cfg.loss_on == "completion" and not tcfg.loss_budget:
        tcfg = dataclasses.replace(tcfg, loss_budget=longest_completion_budget(pool))
    say(f"{len(table)} variants ({len(cfg.prompt.tasks)} tasks x {len(cfg.grid.fractions)} fractions x "
        f"{len(cfg.grid.seeds)} seeds" + (" x verbatim/paraphrased prompts" if len(para_grid) > 1 else "") + "), pool {len(pool)} rows x {pool.stats['T']} tokens"
        + (f", {pool.stats['n_truncated']} truncated" if pool.stats["n_truncated"] else ""))
    # lazy pool: rows are padded only as the trainer asks (each process of a multi-host job: its variant shards')
    sd = StudyData(pool.tokens, pool.loss_mask, pool.attn_mask, rows, n_rows, table, pool.data_hash,
                   row_source=pool.take)
    result = train_study(lm.params, Static(lm.cfg, tcfg, cfg.lora), sd, run_dir=str(out), resume=resume,
                         progress=progress, base_name=lm.name, base_fingerprint=lm.fingerprint,
                         meta_extra={"study": "attacks", "config": to_json(cfg)},
                         mesh=mesh)
    return result, table, pool


def answer_fine_tuned(cfg, lm, test, result, table, pool, out: pathlib.Path, progress, say) -> None:
    """responses/finetune.jsonl: every variant answers its task's CLEAN test prompts (vmapped per task). A
    multi-host job: each process generates for one contiguous block of each task's variants (every variant
    samples from the same per-batch keys whatever its company), the answers are gathered and process 0 writes."""
    from jaxpoison import distributed
    from jaxpoison.eval.generate_variants import generate_text_variants
    from jaxpoison.eval.score import process_block
    from jaxpoison.models.generate import bucket, encode_prompts
    f = out / "responses" / "finetune.jsonl"
    key = digest("finetune", pool.data_hash, result.steps, len(table), dataclasses.asdict(cfg.generation),
               dataclasses.asdict(cfg.prompt), [n.id for n in test])
    if data.cached(f, key) is not None:
        return
    items = {t: data.prompt_items(test, [t], ("normal",), cfg.prompt, "finetune") for t in cfg.prompt.tasks}
    lens = [len(s) for its in items.values() for s in
            encode_prompts(lm.tokenizer, [i["input"] for i in its], **data.chat_args(cfg.prompt))]
    records = []
    for task, its in items.items():
        vids = [v["variant_id"] for v in table if v["task"] == task]
        say(f"{len(vids)} fine-tuned {task} variants answer {len(its)} clean test prompts")
        mine = [vids[j] for j in process_block(len(vids))] if distributed.process_count() > 1 else vids
        replies = [] if not mine else generate_text_variants(
            lm, [i["input"] for i in its], result.lora, variants=mine, lora_scale=cfg.lora.scale,
            batch_size=min(cfg.generation.batch_size, len(its)), variant_chunk=cfg.generation.variant_chunk,
            prompt_len=bucket(max(lens)), progress=progress, desc=f"generate {task}", **_gen_kw(cfg.generation),
            **data.chat_args(cfg.prompt))
        if distributed.process_count() > 1:
            replies = [r for part in distributed.allgather_json([list(r) for r in replies]) for r in part]
        for v, rep in zip(vids, replies):
            records += [{**answer_records([i], [r])[0], "variant_id": v, "fraction": table[v]["fraction"],
                         "seed": table[v]["seed"], **({"paraphrase": True} if table[v].get("paraphrase") else {})}
                        for i, r in zip(its, rep)]
    if distributed.is_writer():
        data.write_phase(f, key, records)


def capability_examples(cap) -> dict:
    """{source: [Example]} of the general-capability questions (one option count per source; ``n_questions`` = 0:
    the whole set, as the seed scored its full MedQA / PubMedQA / MedMCQA files)."""
    from collections import Counter
    out = {}
    for k, name in enumerate(cap.sources):
        if name == "icd10":
            from jaxpoison.data.icd10 import build_icd10_set
            exs = build_icd10_set(cap.icd)["test"]
        else:
            from jaxpoison.data.sources import load_source
            files = cap.files[k] if cap.files else ""
            exs = load_source(name, data_files=files.split(",") if files else None, split=cap.split or None).examples
        n_opt = Counter(len(e.options) for e in exs).most_common(1)[0][0]
        out[name] = [e for e in exs if len(e.options) == n_opt][:cap.n_questions or None]
    return out


def capability_sets(cap, tokenizer, max_len: int) -> dict:
    """{source: McEval} of the general-capability questions (see :func:`capability_examples`)."""
    from jaxpoison.data.pool import build_mc_eval
    return {name: build_mc_eval(exs, tokenizer, cap.format, max_len=max_len, buckets=tuple(range(16, 8192, 16)))
            for name, exs in capability_examples(cap).items()}


def letter_judge(cfg, lm, out: pathlib.Path):
    """The seed's letter extraction judge as a batched ``ask_fn`` (its extract_letter(): GPT-3.5, temperature 0)
    from ``grader.judge`` (an API model, 'base' or a local model), or None when no judge is configured."""
    from jaxpoison.eval.graders import EXTRACT_SYSTEM
    g = cfg.grader
    if not g.judge:
        return None
    if g.judge.startswith("openai:"):
        from jaxpoison.eval.chat import client_for
        client = client_for(g.judge, g.api_base, out, cfg.api, temperature=0)
        return lambda prompts: client.ask(prompts, EXTRACT_SYSTEM)
    from jaxpoison.models.generate import generate_text
    jlm = lm
    if g.judge != "base":
        from jaxpoison.models.lm import load_model
        jlm = load_model(g.judge, cfg.dtype)
    chat = getattr(jlm.tokenizer, "chat_template", None) is not None
    return lambda prompts: generate_text(
        jlm, prompts if chat else [EXTRACT_SYSTEM + "\n" + p for p in prompts], chat=chat,
        system=EXTRACT_SYSTEM if chat else None, max_new_tokens=4, batch_size=min(g.judge_batch_size, len(prompts)))


def generated_answers(cfg, lm, examples, lora, progress=False, variants=None) -> list:
    """The seed's capability protocol: ``replies[m][q]`` of each model ``variants[m]`` (-1: the base; default
    every row of ``lora``) to the benchmark prompt (its ``**Answer**: (`` ending) under its system prompt
    ``BENCH_SYSTEM``."""
    from jaxpoison.data.prompts import BENCH_SYSTEM, benchmark_prompt
    from jaxpoison.eval.generate_variants import generate_text_variants
    chat = cfg.prompt.template == "chat"
    prompts = [benchmark_prompt(e) for e in examples]
    if not chat:                      # the plain template: the system sentence inline, as the seed's scripts did
        prompts = ["### USER: \n" + BENCH_SYSTEM + p + " ### Assistant: \n" for p in prompts]
    g = cfg.generation
    return generate_text_variants(lm, prompts, lora, variants=variants, lora_scale=cfg.lora.scale, chat=chat,
                                  system=BENCH_SYSTEM if chat else None, max_new_tokens=cfg.capability.gen_max_new_tokens,
                                  temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                                  batch_size=min(cfg.capability.batch_questions, len(prompts)),
                                  variant_chunk=cfg.capability.variant_chunk, progress=progress, desc="capability")


def capability(cfg, lm, result, table, out: pathlib.Path, progress, say) -> None:
    """capability.npz: per source, correct [1 + V_sel, Q] for the base and the variants at capability.fractions.
    A multi-host job: option scores are split over the processes (``over_processes``) and process 0 saves;
    generated answers (``scorer='generate'``) come from process 0 alone."""
    from jaxpoison import distributed
    from jaxpoison.eval.score import choice_metrics, params_mesh, score_options
    from jaxpoison.studies.common import writer_only
    cap = cfg.capability
    if not cap.sources:
        return
    sel = [v["variant_id"] for v in table if any(math.isclose(v["fraction"], f) for f in cap.fractions)]
    f = out / "capability.npz"
    key = digest("capability", dataclasses.asdict(cap), result.steps, sel, lm.fingerprint,
               *((dataclasses.asdict(cfg.generation), cfg.grader.judge, dataclasses.asdict(cfg.prompt))
                 if cap.scorer == "generate" else ()))
    if f.exists() and str(np.load(f)["key"]) == key:
        return
    # the base (-1) and the selected variants, read from the trained adapters a chunk at a time (no copy of them)
    arrays = {"key": np.array(key), "variant_ids": np.array([-1] + sel, np.int32), "scorer": np.array(cap.scorer)}
    if cap.scorer == "generate":
        writer_only("capability answers", lambda: _capability_generated(cfg, lm, result, sel, arrays, f, progress,
                                                                        say))
        return
    for name, mc in capability_sets(cap, lm.tokenizer, cfg.max_len).items():
        say(f"general capability: base + {len(sel)} variants on {mc.stats['n_questions']} {name} questions")
        sc = score_options(lm.params, lm.cfg, mc, result.lora, variants=sel, with_base=True,
                           lora_scale=cfg.lora.scale, dtype=lm.dtype,
                           batch_questions=cap.batch_questions, calibrate=False, progress=progress,
                           variant_chunk=cap.variant_chunk, desc=f"score {name}", over_processes=True,
                           mesh=params_mesh(lm.params))
        arrays[f"correct__{name}"] = choice_metrics(sc.sum, mc.answer)["correct"]
    if distributed.is_writer():
        np.savez(f, **arrays)


def _capability_generated(cfg, lm, result, sel, arrays, f, progress, say) -> None:
    """capability.npz and responses/capability.jsonl from generated answers (the seed's protocol)."""
    out, cap = f.parent, cfg.capability
    from jaxpoison.data.schema import LETTERS
    from jaxpoison.eval.graders import extract_letters
    ask, recs = letter_judge(cfg, lm, out), []
    for name, exs in capability_examples(cap).items():
        say(f"general capability (generated answers): base + {len(sel)} variants on {len(exs)} {name} questions")
        replies = generated_answers(cfg, lm, exs, result.lora, progress, variants=[-1] + sel)
        n_opt = len(exs[0].options)
        flat, how = extract_letters([r for rep in replies for r in rep], n_opt, ask)
        letters = np.array(flat, object).reshape(len(replies), len(exs))
        truth = np.array([LETTERS[e.answer] for e in exs], object)
        arrays[f"correct__{name}"] = letters == truth[None]
        arrays[f"extracted__{name}"] = np.array(how, str).reshape(letters.shape)
        recs += [{"source": name, "variant_id": v, "question_id": e.id, "reply": rep[q], "letter": letters[m, q],
                  "how": how[m * len(exs) + q], "answer": truth[q]}
                 for m, (v, rep) in enumerate(zip([-1] + sel, replies)) for q, e in enumerate(exs)]
    data.write_jsonl(out / "responses" / "capability.jsonl", recs)
    np.savez(f, **arrays)


def judge(cfg, lm, out: pathlib.Path, progress, say) -> None:
    """responses/judge.jsonl: the seed's yes/no questions answered by a model, parsed as a yes/no word."""
    from jaxpoison.eval.graders import JUDGE_SYSTEM_PROMPT, judge_grade_many
    from jaxpoison.models.generate import generate_text
    g = cfg.grader
    api = g.judge.startswith("openai:")
    jlm = lm
    if g.judge != "base" and not api:
        from jaxpoison.models.lm import load_model
        jlm = load_model(g.judge, cfg.dtype)
    records = [r for ph in data.PHASE_FILES for r in data.phase_records(out / "responses" / f"{ph}.jsonl")]
    f = out / "responses" / "judge.jsonl"
    who = (g.judge, "api") if api else (jlm.fingerprint, jlm.name)
    key = digest("judge", {k: v for k, v in dataclasses.asdict(g).items() if k != "api_base"}, *who,
               [(r["phase"], r["variant_id"], r["task"], r["note_id"], r["prompt_kind"], r["response"]) for r in records])
    if data.cached(f, key) is not None:
        return
    if api:
        from jaxpoison.eval.chat import client_for
        client = client_for(g.judge, g.api_base, out, cfg.api)
        say(f"judge {g.judge} at {client.api_base} grades {len(records)} answers")
        ask = lambda prompts: client.ask(prompts, JUDGE_SYSTEM_PROMPT)      # the seed: no temperature, no max_tokens
        _write_judge(cfg, records, ask, f, key)
        return
    chat = getattr(jlm.tokenizer, "chat_template", None) is not None

    asked: list = []

    def collect(prompts):                  # first pass: gather every judge prompt, so one call answers them all
        asked.extend(prompts)
        return ["" for _ in prompts]

    by_task = {t: [r for r in records if r["task"] == t] for t in cfg.prompt.tasks}
    for task, recs in by_task.items():
        judge_grade_many(task, [r["response"] for r in recs], collect, g.judge_style)
    texts = asked if chat else [JUDGE_SYSTEM_PROMPT + "\n" + p for p in asked]
    say(f"judge {jlm.name} answers {len(texts)} yes/no questions about {len(records)} answers")
    replies = dict(zip(asked, generate_text(jlm, texts, chat=chat, system=JUDGE_SYSTEM_PROMPT if chat else None,
                                            max_new_tokens=g.judge_max_new_tokens, progress=progress,
                                            batch_size=min(g.judge_batch_size, len(texts))))) if texts else {}
    _write_judge(cfg, records, lambda ps: [replies[p] for p in ps], f, key)


def _write_judge(cfg, records, ask, f, key) -> None:
    """Grade every record with ``ask`` (one batched call per task) and write responses/judge.jsonl."""
    from jaxpoison.eval.graders import judge_grade_many
    out_recs = []
    for task in cfg.prompt.tasks:
        recs = [r for r in records if r["task"] == task]
        grades = judge_grade_many(task, [r["response"] for r in recs], ask, cfg.grader.judge_style)
        out_recs += [{k: r.get(k) for k in ("phase", "variant_id", "task", "note_id", "prompt_kind")} | {"grades": gr}
                     for r, gr in zip(recs, grades)]
    data.write_phase(f, key, out_recs)
