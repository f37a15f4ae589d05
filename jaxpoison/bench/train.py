"""``bench train | variants | eval``: the training engine and the vmapped scorer against transformers + peft.

* train: one LoRA update (forward, backward, clip, AdamW) on a ``[batch, seq]`` batch, whole-sequence loss,
  ours (the engine's step, a segment of ``steps`` updates) vs transformers + peft on the same weights, same
  targets, r, alpha, learning rate; alternated in one process.
* variants: ``V`` variants vmapped in one program vs the single-variant program run ``V`` times in a row.
* eval: multiple-choice scoring (the answer letter's logits at the last position) of the same questions under
  ``V`` adapters: ours vmapped over adapters with the head on one position, vs peft switching adapters with
  ``logits_to_keep=1``.

Each also times the counted matmuls alone (:mod:`.floor`) in the same process and prints every contender's
fraction of that floor; train and eval also the fraction the 1.3x goal asks for (``goal_frac_floor``).
"""
from __future__ import annotations

import time

import numpy as np

from . import common
from .floor import floor_fields, matmul_floor


def _study(lm, V, batch, seq, steps, targets, r, alpha, lr):
    import jax

    from jaxpoison.train.config import TrainConfig
    from jaxpoison.train.engine import Static, init_program, segment_program, variant_keys
    from jaxpoison.train.lora import LoraConfig
    from jaxpoison.train.trainer import StudyData

    R = batch * steps
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, lm.cfg.vocab_size, (R, seq)).astype(np.int32)
    sd = StudyData(tokens, np.ones((R, seq), np.float32), np.ones((R, seq), bool),
                   np.tile(np.arange(R), (V, 1)).astype(np.int32), np.full(V, R, np.int32),
                   [{"variant_id": v, "seed": v} for v in range(V)])
    st = Static(lm.cfg, TrainConfig(learning_rate=lr, epochs=1, batch_size=batch, schedule="constant",
                                    clip_norm=1.0), LoraConfig(r=r, alpha=alpha, targets=targets))
    pool, var = jax.tree.map(jax.numpy.asarray, (sd.pool(), sd.variants()))
    keys = variant_keys(jax.random.PRNGKey(0), var)
    state = init_program(st)(keys)
    seg = segment_program(st, steps)
    holder = {"state": state}

    def run():
        holder["state"], m = seg(holder["state"], np.int32(0), keys, lm.params, pool, var)
        jax.block_until_ready(m)
        return m

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0, tokens


def _peft_trainer(lm, tokens, batch, targets, r, alpha, lr, threads):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    import jax
    hf = common.torch_reference_model(lm.cfg, jax.tree.map(np.asarray, lm.params))
    hf_targets = [{"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                   "up": "up_proj", "down": "down_proj"}[t] for t in targets]
    model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=hf_targets, lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t = torch.from_numpy(tokens[:batch].astype(np.int64))

    def step():
        loss = model(input_ids=t, labels=t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return model, step


def run_train(model="smollm2-135m", batch=8, seq=256, steps=2, rounds=3, targets=("q", "v"), r=16, alpha=32,
              threads=2, compare=True) -> dict:
    from jaxpoison.models.lm import load_model

    lm = load_model(model, "float32", tokenizer=False)
    ours, compile_s, tokens = _study(lm, 1, batch, seq, steps, tuple(targets), r, alpha, 1e-4)
    contenders = {"ours": ours}
    if compare:
        _, step = _peft_trainer(lm, tokens, batch, targets, r, alpha, 1e-4, threads)
        contenders["transformers_peft"] = lambda: [step() for _ in range(steps)]
    peak0 = max(common.matmul_peak_jax(), common.matmul_peak_torch(threads=threads))
    timing = common.alternate(contenders, rounds=rounds, warmup=1 if compare else 0)
    peak = max(peak0, common.matmul_peak_jax(), common.matmul_peak_torch(threads=threads))
    n_tok = batch * seq * steps
    fpt = common.lora_train_flops_per_token(lm.cfg)
    tps = {k: n_tok / v["median"] for k, v in timing.items()}
    floor = matmul_floor(lm.cfg, batch * seq, backward=True, torch_too=compare)
    out = {"bench": "train", "model": model, "batch": batch, "seq": seq, "targets": list(targets), "r": r,
           "ours_tok_s": tps["ours"], "ours_frac_peak": common.mfu(tps["ours"], fpt, peak),
           "peak_gflops": peak, "compile_s": compile_s, "process_peak_rss_mib": common.mib(common.peak_rss_bytes())}
    if compare:
        out.update({"transformers_tok_s": tps["transformers_peft"],
                    "transformers_frac_peak": common.mfu(tps["transformers_peft"], fpt, peak),
                    "ratio": tps["ours"] / tps["transformers_peft"]})
    out.update(floor_fields("dots_", batch * seq, floor, tps, goal_ratio=1.3, baseline="transformers_peft"))
    out["times_s"] = {k: v["times"] for k, v in timing.items()}
    return out


def run_variants(model="smollm2-135m", variants=8, batch=4, seq=128, steps=2, rounds=2, targets=("q", "v"),
                 r=16, alpha=32) -> dict:
    from jaxpoison.models.lm import load_model

    lm = load_model(model, "float32", tokenizer=False)
    together, c1, _ = _study(lm, variants, batch, seq, steps, tuple(targets), r, alpha, 1e-4)
    alone, c2, _ = _study(lm, 1, batch, seq, steps, tuple(targets), r, alpha, 1e-4)
    peak0 = max(common.matmul_peak_jax(), common.matmul_peak_torch(threads=2))
    timing = common.alternate({"vmapped": together, "sequential": lambda: [alone() for _ in range(variants)]},
                              rounds=rounds, warmup=0)
    peak = max(peak0, common.matmul_peak_jax(), common.matmul_peak_torch(threads=2))
    n_tok = variants * batch * seq * steps
    tps = {k: n_tok / v["median"] for k, v in timing.items()}
    fpt = common.lora_train_flops_per_token(lm.cfg)
    floor = matmul_floor(lm.cfg, variants * batch * seq, backward=True, torch_too=False)
    return {"bench": "variants", "model": model, "variants": variants, "batch": batch, "seq": seq,
            "vmapped_tok_s": tps["vmapped"], "sequential_tok_s": tps["sequential"],
            "ratio": tps["vmapped"] / tps["sequential"], "vmapped_frac_peak": common.mfu(tps["vmapped"], fpt, peak),
            "sequential_frac_peak": common.mfu(tps["sequential"], fpt, peak), "peak_gflops": peak,
            **floor_fields("dots_", variants * batch * seq, floor, tps),
            "compile_s": {"vmapped": c1, "single": c2}, "process_peak_rss_mib": common.mib(common.peak_rss_bytes()),
            "times_s": {k: v["times"] for k, v in timing.items()}}


def run_eval(model="smollm2-135m", variants=8, questions=16, seq=128, rounds=2, r=16, alpha=32, threads=2) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from peft import LoraConfig as PeftLora, get_peft_model

    from jaxpoison.models.decoder import Decoder
    from jaxpoison.models.heads import logits as head_logits
    from jaxpoison.models.lm import load_model
    from jaxpoison.train.lora import LoraConfig, init_lora, stack_variants

    torch.set_num_threads(threads)
    lm = load_model(model, "float32", tokenizer=False)
    cfg = lm.cfg
    lc = LoraConfig(r=r, alpha=alpha, targets=("q", "v"))
    rng = np.random.default_rng(0)
    loras = []
    for v in range(variants):   # non-zero B so that every adapter changes the scores
        l = init_lora(jax.random.PRNGKey(v), cfg, lc)
        loras.append({m: {"a": ab["a"], "b": 0.01 * jax.random.normal(jax.random.PRNGKey(100 + v), ab["b"].shape)}
                      for m, ab in l.items()})
    stacked = stack_variants(loras)
    tokens_np = rng.integers(0, cfg.vocab_size, (questions, seq)).astype(np.int32)
    letters = jnp.asarray(rng.integers(0, cfg.vocab_size, 4).astype(np.int32))
    tokens = jnp.asarray(tokens_np)

    @jax.jit
    def ours_fn(lora, toks):
        def one(l):
            h, _ = Decoder(cfg, jnp.float32, lc.scale).apply({"params": lm.params}, toks, lora=l)
            return head_logits(lm.params, cfg, h[:, -1])[:, letters]
        return jax.vmap(one)(lora)

    t0 = time.perf_counter()
    ours_out = ours_fn(stacked, tokens).block_until_ready()
    compile_s = time.perf_counter() - t0

    hf = common.torch_reference_model(cfg, jax.tree.map(np.asarray, lm.params))
    pm = get_peft_model(hf, PeftLora(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]),
                        adapter_name="v0")
    for v in range(1, variants):
        pm.add_adapter(f"v{v}", PeftLora(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for v, l in enumerate(loras):
            for name, p in pm.named_parameters():
                if f".lora_A.v{v}." in name or f".lora_B.v{v}." in name:
                    layer = int(name.split(".layers.")[1].split(".")[0])
                    mod = "q" if "q_proj" in name else "v"
                    src = l[mod]["a" if "lora_A" in name else "b"][layer]
                    p.copy_(torch.from_numpy(np.asarray(src).T.copy()))
    pm.eval()
    t_tok = torch.from_numpy(tokens_np.astype(np.int64))
    t_letters = torch.from_numpy(np.asarray(letters).astype(np.int64))
    ref_out = {}

    def reference():
        outs = []
        with torch.no_grad():
            for v in range(variants):
                pm.set_adapter(f"v{v}")
                outs.append(pm(input_ids=t_tok, logits_to_keep=1).logits[:, -1][:, t_letters])
        ref_out["x"] = torch.stack(outs)

    timing = common.alternate({"ours": lambda: ours_fn(stacked, tokens).block_until_ready(),
                               "transformers_peft": reference}, rounds=rounds, warmup=1)
    peak = max(common.matmul_peak_jax(), common.matmul_peak_torch(threads=threads))
    n_tok = variants * questions * seq
    fpt = 2 * (cfg.matmul_params() - cfg.hidden_size * cfg.vocab_size)   # the head runs on one position only
    tps = {k: n_tok / v["median"] for k, v in timing.items()}
    floor = matmul_floor(cfg, n_tok, backward=False, head=False)
    diff = float(np.abs(np.asarray(ours_out) - ref_out["x"].numpy()).max())
    return {"bench": "eval", "model": model, "variants": variants, "questions": questions, "seq": seq,
            "ours_tok_s": tps["ours"], "transformers_tok_s": tps["transformers_peft"],
            "ratio": tps["ours"] / tps["transformers_peft"], "ours_frac_peak": common.mfu(tps["ours"], fpt, peak),
            "transformers_frac_peak": common.mfu(tps["transformers_peft"], fpt, peak), "peak_gflops": peak,
            "max_abs_logit_diff": diff, "compile_s": compile_s,
            **floor_fields("dots_", n_tok, floor, tps, goal_ratio=1.3, baseline="transformers_peft"),
            "process_peak_rss_mib": common.mib(common.peak_rss_bytes()),
            "times_s": {k: v["times"] for k, v in timing.items()}}


def register(bench_sub) -> None:
    p = bench_sub.add_parser("train", help="LoRA train-step tokens/s: ours vs transformers + peft, and the matmul floor")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="updates per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", default="q,v", help="LoRA target modules (comma list)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--compare", default="torch", choices=["torch", "none"])
    p.set_defaults(func=lambda a: common.emit(run_train(
        a.model, a.batch, a.seq, a.steps, a.rounds, tuple(a.targets.split(",")), a.r,
        compare=a.compare == "torch")) and 0)

    p = bench_sub.add_parser("variants", help="V variants vmapped vs V single-variant runs in a row")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(func=lambda a: common.emit(run_variants(
        a.model, a.variants, a.batch, a.seq, a.steps, a.rounds)) and 0)

    p = bench_sub.add_parser("eval", help="multiple-choice scoring under V adapters: ours vmapped vs peft")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", type=int, default=8)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(func=lambda a: common.emit(run_eval(a.model, a.variants, a.questions, a.seq, a.rounds)) and 0)
