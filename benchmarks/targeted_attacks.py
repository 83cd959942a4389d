"""Success rates of the targeted and clean-label attacks in their papers' settings (issue 17).

Run by hand, not in CI; each part writes ``OUT/<part>.json`` (one row per measurement, the
summary last) and appends every line it prints to ``OUT/<part>.log``. A part that is run again with
the same ``--out`` skips the measurements already in its JSON, so a long run can be stopped and
resumed (and runs in the background: ``nohup python ... &``).

  gradient_matching  Witches' Brew (Geiping et al. 2021): success rate over random (target image,
                     adversarial class) pairs, 1% budget, eps 16/255, the paper's 8 restarts x 240
                     steps unless --restarts/--steps say otherwise; each pair's victim is trained from
                     scratch on the poisoned set (a seed the surrogate did not use). --controls adds a
                     clean model of each victim's seed, so that the poisons' effect on the target is
                     read against the same seed without them (p_adv_lift). Each pair's poisons are
                     stored in OUT/cache; --victim-set FIELD=VALUE trains victims and controls with a
                     changed recipe on the same poisons (an ablation without new crafting), and
                     --first-pair measures only the later pairs. Two diagnostics: --victim-seed surrogate
                     trains the victim with the surrogate's own seed (known initialisation: only the
                     poisons differ), --victim-init surrogate trains it on from the surrogate's weights
                     (fine-tuning), --craft-shift sets the crafting augmentation's translation.
                     Paper: about 90% for ResNet-18 on CIFAR-10.
  gm_alignment       For each pair gradient_matching stored: the poisons' alignment on the surrogate read
                     off the stored (uint8) poisoned set, beside the same images unperturbed (no training).
  nn_flip            Study 3: over (target, seed) pairs, the target's adversarial-class probability and
                     whether its label flips, for every --k x --feature-spaces x --metrics; victims
                     retrained from scratch. Study: p(dog) 92% for a deer, 250 neighbours, ResNet-18.
  feature_collision  Poison Frogs (Shafahi et al. 2018), transfer learning: 50 poisons with a 30%
                     watermark against the clean model's frozen features, over --targets targets.
                     Two victims: "frozen" (the clean model's head retrained on the whole poisoned
                     set, what the experiment runner does) and "pair" (a new linear head trained on
                     the frozen features of the target's and the base's classes only, --pair-train
                     images each: the paper's dog-vs-fish setting). Paper: ~100% (one poison, pair).
  label_consistent   Turner et al. 2019: ASR of a victim trained from scratch on the poisoned set, for
                     every --rates x --amplitudes x --surrogates; records how long the adversarial
                     training of the surrogate took.

The victim/surrogate recipe is the fast CIFAR-10 recipe (``--model``, ``--epochs``, ``--lr`` ...);
pass the strong model the lead measures with (e.g. ``--model airnet`` once it exists). Check that
a part runs end to end on a tiny slice first:

    python benchmarks/targeted_attacks.py gradient_matching --n-train 2000 --epochs 1 --pairs 1 \\
        --steps 2 --restarts 1 --out /tmp/ta
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class Bench:
    """Rows of one part: loaded from and written to ``OUT/<part>.json``, printed and logged as they come."""

    def __init__(self, out: Path, part: str, argv: list[str]):
        self.json, self.log = out / f"{part}.json", out / f"{part}.log"
        out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = json.loads(self.json.read_text()) if self.json.exists() else []
        self.add({"event": "start", "argv": argv, "machine": platform.processor() or platform.machine(),
                  "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "load": os.getloadavg(),
                  "cuda": torch.cuda.is_available()})

    def done(self, key: str) -> dict | None:
        return next((r for r in self.rows if r.get("key") == key), None)

    def add(self, row: dict) -> dict:
        from poisonlab.utils import atomic_write_text, to_json

        self.rows.append(row)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        with open(self.log, "a") as f:
            f.write(line + "\n")
        atomic_write_text(self.json, to_json(self.rows))
        return row


# ------------------------------------------------------------------------------------------ plumbing
def _data(args):
    from poisonlab import load_dataset

    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    if args.n_train < len(train):
        train = train.stratified_subset(args.n_train, seed=0)
    return train, test


def _recipe_id(args) -> str:
    """A short name of the data slice and the recipe: part of every key, so a changed recipe is measured anew."""
    import hashlib

    spec = [args.n_train, args.model, args.model_params, args.epochs, args.lr, args.batch_size, args.label_smoothing,
            args.crop_padding, args.bf16]
    if args.preset:  # the preset replaces the recipe flags; earlier keys (no preset) stay as they were
        spec = [args.n_train, args.model, args.model_params, args.preset, args.bf16]
        return f"{args.model}-{args.preset}-" + hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:8]
    return f"{args.model}-{args.epochs}e-" + hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:8]


def _recipe(args, victim: bool = False):
    """The surrogate's recipe; with ``victim`` (gradient_matching's victims and controls) ``--victim-set`` applied."""
    from poisonlab import TrainConfig

    if args.preset:
        cfg = TrainConfig(preset=args.preset, **({} if args.bf16 is None else {"bf16": args.bf16}))
    else:
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          label_smoothing=args.label_smoothing, crop_padding=args.crop_padding, flip=True,
                          warmup_fraction=0.15, bf16=args.bf16)
    if victim and args.victim_set:
        cfg = TrainConfig(**{**cfg.model_dump(), **args.victim_set})
    return cfg


def _victim_suffix(args) -> str:
    """Part of a victim's key (and so of its control's) when ``--victim-set`` changes the victim recipe; the
    control's model file is named by a digest of the same settings (:func:`_clean`)."""
    return "" if not args.victim_set else "/victim:" + json.dumps(args.victim_set, sort_keys=True)


def _parse_victim_set(ap, items: list[str]) -> dict[str, Any]:
    """``FIELD=VALUE`` pairs (VALUE read as JSON, else as a string), checked against TrainConfig."""
    from pydantic import ValidationError

    from poisonlab import TrainConfig

    out: dict[str, Any] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or field not in TrainConfig.model_fields or field == "preset":
            ap.error(f"--victim-set {item!r}: give FIELD=VALUE with FIELD a TrainConfig field other than preset")
        try:
            out[field] = json.loads(value)
        except json.JSONDecodeError:
            out[field] = value
    try:
        TrainConfig(**out)
    except ValidationError as e:
        ap.error(f"--victim-set: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
    return out


def _new_model(args, train):
    from poisonlab import build_model

    h, _, c = train.shape
    params = json.loads(args.model_params) if args.model_params else {}
    return build_model(args.model, c, train.num_classes, h, *train.channel_stats(), **params).to(args.device)


def _train(args, train, seed: int, victim: bool = False, init: dict | None = None):
    """A model trained on ``train`` with the benchmark's recipe (``victim``: see :func:`_recipe`), from
    scratch or, given ``init`` (a state dict), from those weights (their whitened stem is kept);
    ``(model, seconds)``."""
    from poisonlab import fit

    torch.manual_seed(seed)
    model = _new_model(args, train)
    if init is not None:
        model.load_state_dict(init)
    t0 = time.perf_counter()
    fit(model, train, _recipe(args, victim), seed=seed)
    return model.eval(), time.perf_counter() - t0


def _clean(args, bench: Bench, train, test, seed: int, victim: bool = False, init: dict | None = None):
    """The clean model of ``seed`` (trained once, saved under OUT, reloaded on a rerun); ``victim``: with
    the victims' recipe (``--victim-set``), saved under its own name; ``init``: trained on from the
    surrogate's weights (``--victim-init surrogate``), saved under a name ending ``_ft``."""
    from poisonlab.experiments.cache import digest
    from poisonlab.utils import load_state_dict, save_state_dict

    if args.clean_model is not None:
        return _given_clean(args, bench, train, test)
    suffix = f"_v{digest(args.victim_set)[:8]}" if victim and args.victim_set else ""
    fields = {"victim_set": args.victim_set} if suffix else {}
    if init is not None:
        suffix += "_ft"
        fields["init"] = "surrogate"
    path = Path(args.out) / f"clean_{_recipe_id(args)}{suffix}_s{seed}.pt"
    if path.exists():
        model = _new_model(args, train)
        model.load_state_dict(load_state_dict(path))
        return model.eval()
    model, secs = _train(args, train, seed, victim, init)
    save_state_dict(model, path)
    _log_clean(bench, model, test, seed=seed, seconds=round(secs, 1), **fields)
    return model


def _log_clean(bench: Bench, model, test, **fields) -> None:
    """Log the clean model's test accuracy (with ``fields``), noting when it is below the issue's 90%."""
    from poisonlab.metrics import evaluate

    acc = evaluate(model, test)["clean_acc"]
    bench.add({"event": "clean_model", **fields, "clean_acc": round(acc, 4),
               "note": "" if acc >= 0.9 else "below the issue's 90% clean accuracy: use the strong recipe/model"})


def _given_clean(args, bench: Bench, train, test):
    """The clean model of ``--clean-model`` (a state dict poisonlab saved, e.g. a grid cache's
    ``clean/<key>/model.pt``), checked to be a ``--model`` of this data's shape; its accuracy is logged."""
    from poisonlab.errors import DataError
    from poisonlab.utils import load_state_dict

    path = Path(args.clean_model)
    if not path.is_file():
        raise SystemExit(f"--clean-model: {path} is not a file")
    model = _new_model(args, train)
    try:
        model.load_state_dict(load_state_dict(path))
    except (DataError, RuntimeError) as e:
        raise SystemExit(f"--clean-model: {path} is not a {args.model} for this data "
                         f"({str(e).strip().splitlines()[0][:200]})") from None
    model.eval()
    _log_clean(bench, model, test, **{"from": str(path)})
    return model


def _seeded(args, bench: Bench, train, test):
    """``(seed, clean model, attack context)`` for each of the ``--seeds`` seeds."""
    from poisonlab.attacks import AttackContext

    for seed in range(args.seed, args.seed + args.seeds):
        clean = _clean(args, bench, train, test, seed)
        yield seed, clean, AttackContext(test=test, clean_model=clean)


def _target_probs(model, test, idx) -> np.ndarray:
    from poisonlab.training import predict_proba

    return predict_proba(model, test.images[np.atleast_1d(idx)])[0]


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _summary(bench: Bench, part: str, rows: list[dict], field: str, by: Callable[[dict], Any] = lambda r: "all"):
    groups: dict[Any, list[float]] = {}
    for r in rows:
        groups.setdefault(str(by(r)), []).append(float(r[field]))
    for g, v in groups.items():
        bench.add({"event": "summary", "part": part, "group": g, "n": len(v), field: round(float(np.mean(v)), 4)})


# ------------------------------------------------------------------------------------------ the parts
def gradient_matching(args, bench: Bench) -> None:
    from poisonlab.attacks.gradient_matching import crafting_flops_per_poison_step
    from poisonlab.metrics import evaluate

    train, test = _data(args)
    _, clean, ctx = next(_seeded(args, bench, train, test))  # one clean model: --seed
    n_poisons = round(args.budget * len(train))
    per_step = crafting_flops_per_poison_step(clean, train.shape)
    pflop = per_step * n_poisons * args.steps * args.restarts / 1e15
    bench.add({"event": "crafting_cost", "gflop_per_poison_step": round(per_step / 1e9, 3), "n_poisons": n_poisons,
               "pflop_per_pair": float(f"{pflop:.4g}")})
    # The fine-tuning diagnostic: victims (and controls) train on from the surrogate's weights, the model
    # the poisons were crafted against; one copy serves every pair.
    init = {k: v.detach().clone() for k, v in clean.state_dict().items()} if args.victim_init == "surrogate" else None
    rows, controls = [], []
    for pair in range(args.first_pair, args.pairs):
        craft_key = f"{_recipe_id(args)}/gm/{pair}/b{args.budget}/e{args.eps}/s{args.steps}x{args.restarts}"
        if args.craft_label_smoothing:  # earlier keys (plain cross-entropy) stay as they were
            craft_key += f"/ls{args.craft_label_smoothing}"
        if args.craft_shift is not None:  # earlier keys (the attack's default shift) stay as they were
            craft_key += f"/shift{args.craft_shift}"
        key = craft_key + _victim_suffix(args)
        if args.victim_seed == "surrogate":
            # The known-initialisation diagnostic: the victim starts from the surrogate's weights at
            # initialisation and sees its batch order, so only the poisons differ; its control is the
            # surrogate itself (the same file). Not the paper's black-box setting.
            key += "/seed:surrogate"
            victim_seed = args.seed
        else:
            victim_seed = args.seed + 1 + pair  # one the surrogate did not use; its control uses it too
        if init is not None:
            key += "/init:surrogate"
        row = bench.done(key)
        if row is None:
            poisoned, rec, reused = _gm_poisons(args, train, ctx, craft_key, pair)
            victim, vsecs = _train(args, poisoned, seed=victim_seed, victim=True, init=init)
            t, adv = int(rec.target_indices[0]), int(rec.adversarial_labels[0])
            p = _target_probs(victim, test, t)
            row = bench.add({"key": key, "part": "gradient_matching", "target": t, "target_class": int(test.labels[t]),
                             "adversarial_class": adv, "n_poisons": len(rec.indices), "poisons_reused": reused,
                             "victim_set": args.victim_set, "victim_seed": victim_seed,
                             "victim_init": args.victim_init,
                             "poison_seconds": round(rec.seconds, 1), "victim_seconds": round(vsecs, 1),
                             "crafting_pflop": float(f"{pflop:.4g}"),
                             "crafting_tflops": float(f"{pflop * 1e3 / max(rec.seconds, 1e-9):.4g}"),
                             "p_adv_clean": round(float(_target_probs(clean, test, t)[adv]), 4),
                             "p_adv_victim": round(float(p[adv]), 4), "success": bool(p.argmax() == adv),
                             "victim_clean_acc": round(evaluate(victim, test)["clean_acc"], 4),
                             **_scalars(rec.extra)})
        rows.append(row)
        if args.controls:
            controls.append(_control(args, bench, train, test, row, seed=victim_seed, init=init))
    _summary(bench, "gradient_matching", rows, "success")
    if controls:
        _summary(bench, "gradient_matching_control", controls, "p_adv_lift")


def gm_alignment(args, bench: Bench) -> None:
    """For every pair stored under OUT/cache/gm_poisons by ``gradient_matching`` with this recipe: the
    alignment the stored (uint8) poisons carry on the surrogate, beside that of the same images unperturbed
    and the crafting's own ``final_alignment`` -- a check that what the victims train on is what was crafted."""
    from poisonlab.attacks.gradient_matching import poison_alignment
    from poisonlab.errors import ParameterError
    from poisonlab.experiments.cache import ArtifactCache, poisoning_from_entry

    cache = ArtifactCache(Path(args.out) / "cache")
    folder = cache.root / "gm_poisons"
    entries = []  # (folder, meta) of this recipe's pairs; others were crafted against another surrogate
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        meta = cache.meta("gm_poisons", entry.name) if cache.has("gm_poisons", entry.name) else {}
        if str(meta.get("craft_key", "")).startswith(_recipe_id(args) + "/"):
            entries.append((entry, meta))
    if not entries:
        bench.add({"event": "warning", "note": f"no stored gradient_matching poisons of recipe {_recipe_id(args)} "
                                               f"under {folder}"})
        return
    train, test = _data(args)
    _, clean, _ = next(_seeded(args, bench, train, test))  # the surrogate: --seed, as gradient_matching's
    for entry, meta in entries:
        craft_key = meta["craft_key"]
        if bench.done(f"align/{craft_key}") is None:
            poisoned, rec = poisoning_from_entry(train, meta, cache.arrays("gm_poisons", entry.name))
            t, adv = int(rec.target_indices[0]), int(rec.adversarial_labels[0])
            ls = rec.params.get("label_smoothing") or 0.0
            try:  # poison_alignment checks the stored label smoothing's range
                align = {name: poison_alignment(clean, imgs[rec.indices], poisoned.labels[rec.indices],
                                                test.images[[t]], adv, label_smoothing=ls)
                         for name, imgs in (("stored", poisoned.images), ("unperturbed", train.images))}
            except ParameterError as e:
                bench.add({"event": "warning", "note": f"{entry / 'meta.json'}: {e}; entry skipped"})
                continue
            bench.add({"key": f"align/{craft_key}", "part": "gm_alignment", "target": t,
                       "adversarial_class": adv, "n_poisons": len(rec.indices),
                       "final_alignment_crafting": rec.extra.get("final_alignment"),
                       "alignment_stored": round(align["stored"], 4),
                       "alignment_unperturbed": round(align["unperturbed"], 4)})


# The crafting options and the attack parameters they set; the attack itself checks their ranges.
GM_OPTIONS = {"budget": "--budget", "epsilon": "--eps", "steps": "--steps", "restarts": "--restarts",
              "label_smoothing": "--craft-label-smoothing", "shift": "--craft-shift"}


def _gm_attack(args):
    """The gradient-matching attack the crafting options describe (raises ParameterError on a bad one)."""
    from poisonlab import get_attack

    return get_attack("gradient_matching", budget=args.budget, epsilon=args.eps, steps=args.steps,
                      restarts=args.restarts, label_smoothing=args.craft_label_smoothing, shift=args.craft_shift)


def _gm_poisons(args, train, ctx, craft_key: str, pair: int):
    """The pair's ``(poisoned set, record, reused)``: crafted once and stored in poisonlab's artifact cache
    under ``OUT/cache/gm_poisons``, so that victims with another recipe (``--victim-set``) reuse them."""
    from poisonlab.experiments.cache import ArtifactCache, digest, poisoning_from_entry, poisoning_to_entry

    cache, ck = ArtifactCache(Path(args.out) / "cache"), digest(craft_key)
    if cache.has("gm_poisons", ck):
        return (*poisoning_from_entry(train, cache.meta("gm_poisons", ck), cache.arrays("gm_poisons", ck)), True)
    poisoned, rec = _gm_attack(args).poison(train, seed=1000 + pair, context=ctx)  # random target and class per pair
    entry = poisoning_to_entry(train.images, train.labels, poisoned, rec)
    if entry is not None:
        cache.put("gm_poisons", ck, {**entry[0], "craft_key": craft_key}, entry[1])
    return poisoned, rec, False


def _control(args, bench: Bench, train, test, row: dict, seed: int, init: dict | None = None) -> dict:
    """What the pair's victim would have said without the poisons: the target's adversarial-class
    probability under a clean model trained with the victim's seed (saved under OUT like every clean
    model, so one per seed). ``p_adv_lift`` is the victim's probability minus this one, a paired
    measure of the poisons' effect that does not mix in the spread between seeds."""
    key = f"{row['key']}/control"
    done = bench.done(key)
    if done is not None:
        return done
    t, adv = row["target"], row["adversarial_class"]
    p = _target_probs(_clean(args, bench, train, test, seed, victim=True, init=init), test, t)
    p_adv = float(p[adv])
    return bench.add({"key": key, "part": "gradient_matching_control", "seed": seed, "target": t,
                      "adversarial_class": adv, "p_adv_control": round(p_adv, 4),
                      "p_adv_victim": row["p_adv_victim"], "p_adv_lift": round(row["p_adv_victim"] - p_adv, 4),
                      "control_predicts_adv": bool(p.argmax() == adv)})


def nn_flip(args, bench: Bench) -> None:
    from poisonlab import get_attack
    from poisonlab.metrics import evaluate
    from poisonlab.training import predict_proba

    train, test = _data(args)
    rows = []
    for seed, clean, ctx in _seeded(args, bench, train, test):
        pool = np.nonzero(test.labels == args.target_class)[0]
        pool = pool[predict_proba(clean, test.images[pool]).argmax(1) == args.target_class]
        if len(pool) < args.targets:
            bench.add({"event": "warning", "seed": seed, "note": f"only {len(pool)} test images of class "
                       f"{args.target_class} are classified correctly by the clean model"})
        targets = np.random.default_rng(seed).choice(pool, size=min(args.targets, len(pool)), replace=False)
        for t in targets:
            for k in args.k:
                for space in args.feature_spaces:
                    for metric in args.metrics:
                        key = f"{_recipe_id(args)}/nn/{seed}/{t}/{k}/{space}/{metric}"
                        row = bench.done(key)
                        if row is None:
                            attack = get_attack("nn_flip", k=k, target_index=int(t), adversarial_class=args.adversarial_class,
                                                feature_space=space, metric=metric)
                            poisoned, rec = attack.poison(train, seed=seed, context=ctx)
                            victim, vsecs = _train(args, poisoned, seed=seed)  # same seed as the clean model
                            p = _target_probs(victim, test, t)
                            a, c = args.adversarial_class, int(test.labels[t])
                            row = bench.add({"key": key, "part": "nn_flip", "seed": seed, "target": int(t), "k": k,
                                             "feature_space": space, "metric": metric,
                                             "p_true_clean": round(float(_target_probs(clean, test, t)[c]), 4),
                                             "p_adv_clean": round(float(_target_probs(clean, test, t)[a]), 4),
                                             "p_true_victim": round(float(p[c]), 4), "p_adv_victim": round(float(p[a]), 4),
                                             "flipped": bool(p.argmax() == a), "victim_seconds": round(vsecs, 1),
                                             "victim_clean_acc": round(evaluate(victim, test)["clean_acc"], 4)})
                        rows.append(row)
    by = lambda r: f"k={r['k']} {r['feature_space']} {r['metric']}"  # noqa: E731
    _summary(bench, "nn_flip", rows, "flipped", by)
    _summary(bench, "nn_flip", rows, "p_adv_victim", by)


def _linear_head(feats: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], iters: int = 500):
    """The paper's transfer victim: a new linear (logistic) head on frozen features, cold start.

    Trained on the rows of ``classes`` (their labels mapped to 0..len-1); returns
    ``f(features) -> probabilities (N, len(classes))`` in the order of ``classes``. Features are
    standardised on the training rows; L-BFGS with a small L2 term (1e-4) so that a separable case
    stays finite. No augmentation: the features are computed once, as in transfer learning.
    """
    from torch import nn

    x = torch.from_numpy(feats).double()
    index = {c: j for j, c in enumerate(classes)}
    y = torch.tensor([index[int(c)] for c in labels], dtype=torch.long)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    lin = nn.Linear(x.shape[1], len(classes)).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(lin((x - mu) / sd), y) + 1e-4 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda f: torch.softmax(lin((torch.from_numpy(f).double() - mu) / sd), 1).detach().numpy()


def feature_collision(args, bench: Bench) -> None:
    from poisonlab import get_attack
    from poisonlab.training import extract_features

    train, test = _data(args)
    _, clean, ctx = next(_seeded(args, bench, train, test))  # one clean model: --seed
    t0 = time.perf_counter()
    clean_feats = extract_features(clean, train)  # the frozen extractor's view of the clean training set, once
    bench.add({"event": "clean_features", "n": len(train), "dim": clean_feats.shape[1],
               "seconds": round(time.perf_counter() - t0, 1)})
    classes = tuple(range(train.num_classes))
    clean_head = _linear_head(clean_feats, train.labels, classes)  # the same victim without poisons
    rows = []
    for i in range(args.targets):
        key = f"{_recipe_id(args)}/fc/{i}/n{args.n_poisons}/o{args.opacity}/s{args.fc_steps}"
        if args.clean_model is not None:
            key += "/given-clean"
        row = bench.done(key)
        if row is None:
            attack = get_attack("feature_collision", n_poisons=args.n_poisons, opacity=args.opacity, steps=args.fc_steps)
            poisoned, rec = attack.poison(train, seed=2000 + i, context=ctx)
            t, adv = int(rec.target_indices[0]), int(rec.adversarial_labels[0])
            tc = int(test.labels[t])
            target_feats = extract_features(clean, test.images[t:t + 1])
            # transfer learning, 10 classes: a new linear head on the frozen features of the whole poisoned set
            # (the poisons' features replace their bases'; labels unchanged), no augmentation
            feats = clean_feats.copy()
            feats[rec.indices] = extract_features(clean, poisoned.images[rec.indices])
            t1 = time.perf_counter()
            p_frozen = _linear_head(feats, poisoned.labels, classes)(target_feats)[0]
            fsecs = time.perf_counter() - t1
            p_frozen_clean = clean_head(target_feats)[0]
            # the paper's setting: a binary head on the two classes, --pair-train clean images each + the poisons
            rng = np.random.default_rng(i)
            clean_rows = np.concatenate([rng.permutation(np.nonzero((train.labels == c)
                                                                     & ~rec.poison_mask(len(train)))[0])[:args.pair_train]
                                         for c in (tc, adv)])
            keep = np.concatenate([clean_rows, rec.indices])
            p_pair = float(_linear_head(feats[keep], poisoned.labels[keep], (tc, adv))(target_feats)[0, 1])
            p_pair_clean = float(_linear_head(clean_feats[clean_rows], train.labels[clean_rows],
                                              (tc, adv))(target_feats)[0, 1])
            row = bench.add({"key": key, "part": "feature_collision", "target": t, "target_class": tc,
                             "adversarial_class": adv, "n_poisons": len(rec.indices),
                             "poison_seconds": round(rec.seconds, 1), "frozen_victim_seconds": round(fsecs, 1),
                             "p_adv_frozen": round(float(p_frozen[adv]), 4),
                             "success_frozen": bool(p_frozen.argmax() == adv),
                             "p_adv_frozen_without_poisons": round(float(p_frozen_clean[adv]), 4),
                             "p_adv_pair": round(p_pair, 4), "p_adv_pair_without_poisons": round(p_pair_clean, 4),
                             "success_pair": bool(p_pair > 0.5), **_scalars(rec.extra)})
        rows.append(row)
    _summary(bench, "feature_collision", rows, "success_frozen")
    _summary(bench, "feature_collision", rows, "success_pair")


def label_consistent(args, bench: Bench) -> None:
    from poisonlab import get_attack
    from poisonlab.metrics import evaluate

    train, test = _data(args)
    rows = []
    for seed, _, ctx in _seeded(args, bench, train, test):
        for surrogate in args.surrogates:
            for rate in args.rates:
                for amp in args.amplitudes:
                    key = f"{_recipe_id(args)}/lc/{seed}/{surrogate}/r{rate}/a{amp}/e{args.lc_eps}/se{args.surrogate_epochs}"
                    row = bench.done(key)
                    if row is None:
                        attack = get_attack("label_consistent", rate=rate, target=args.target_class, eps=args.lc_eps,
                                            amplitude=amp, surrogate=surrogate, surrogate_epochs=args.surrogate_epochs,
                                            surrogate_lr=args.surrogate_lr)
                        poisoned, rec = attack.poison(train, seed=seed, context=ctx)
                        victim, vsecs = _train(args, poisoned, seed=seed + 100)
                        m = evaluate(victim, test, rec)
                        sur = rec.extra.get("surrogate", {})
                        row = bench.add({"key": key, "part": "label_consistent", "seed": seed, "surrogate": surrogate,
                                         "rate": rate, "amplitude": amp, "eps": args.lc_eps,
                                         "n_poisons": len(rec.indices), "poison_seconds": round(rec.seconds, 1),
                                         "surrogate_seconds": round(sur.get("seconds", 0.0), 1),
                                         "victim_seconds": round(vsecs, 1), "asr": round(m["asr"], 4),
                                         "clean_acc": round(m["clean_acc"], 4),
                                         "pgd_fooled": rec.extra["pgd_fooled"], "clean_fooled": rec.extra["clean_fooled"]})
                    rows.append(row)
    _summary(bench, "label_consistent", rows, "asr", lambda r: f"{r['surrogate']} rate={r['rate']} amp={r['amplitude']}")


PARTS = {"gradient_matching": gradient_matching, "gm_alignment": gm_alignment, "nn_flip": nn_flip,
         "feature_collision": feature_collision, "label_consistent": label_consistent}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=sorted(PARTS))
    ap.add_argument("--out", required=True, help="folder for <part>.json, <part>.log and the clean models")
    ap.add_argument("--data-dir", default=os.environ.get("POISONLAB_DATA", "../shared/data"))
    ap.add_argument("--n-train", type=int, default=50_000, help="a stratified slice of CIFAR-10 (checks only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    g = ap.add_argument_group("victim and surrogate recipe")
    g.add_argument("--model", default="fastnet")
    g.add_argument("--model-params", default=None, help='JSON, e.g. \'{"widths": [64, 128, 256]}\'')
    g.add_argument("--preset", default=None, choices=["airbench94", "airbench_quick"],
                   help="train victims with this TrainConfig preset (then --epochs, --lr, --batch-size, "
                        "--label-smoothing and --crop-padding are not used); e.g. --model airnet --preset airbench94")
    g.add_argument("--clean-model", default=None,
                   help="a saved state dict of a --model trained on the same data (e.g. a grid cache's "
                        "clean/<key>/model.pt): used as the clean model instead of training one (one --seed only)")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--lr", type=float, default=0.4)
    g.add_argument("--batch-size", type=int, default=512)
    g.add_argument("--label-smoothing", type=float, default=0.2)
    g.add_argument("--crop-padding", type=int, default=2)
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where poisonlab.training.use_bf16 says so for 32x32 images)")
    g = ap.add_argument_group("gradient_matching")
    g.add_argument("--pairs", type=int, default=10)
    g.add_argument("--budget", type=float, default=0.01)
    g.add_argument("--eps", type=float, default=16 / 255)
    g.add_argument("--steps", type=int, default=240)
    g.add_argument("--restarts", type=int, default=8)
    g.add_argument("--controls", action="store_true",
                   help="also train a clean model with each pair's victim seed and record the target's "
                        "adversarial-class probability under it (p_adv_control, p_adv_lift): about one more "
                        "victim's time per pair, the model is saved under OUT and reused")
    g.add_argument("--first-pair", type=int, default=0, help="measure pairs FIRST_PAIR .. PAIRS-1")
    g.add_argument("--craft-label-smoothing", type=float, default=0.0,
                   help="label smoothing of the poisons' loss while crafting (paper: 0); e.g. 0.2 to match "
                        "airbench94's victims")
    g.add_argument("--craft-shift", type=int, default=None,
                   help="translation of the crafting's differentiable augmentation, pixels (default: the "
                        "attack's, 4 on CIFAR-10); e.g. 2 to match airbench94's crop padding")
    g.add_argument("--victim-seed", choices=["fresh", "surrogate"], default="fresh",
                   help="fresh: each victim trains with a seed the surrogate did not use (the paper's setting); "
                        "surrogate: with the surrogate's own --seed, so only the poisons differ from the "
                        "surrogate's training (a diagnostic: does the crafted alignment act at all?)")
    g.add_argument("--victim-init", choices=["scratch", "surrogate"], default="scratch",
                   help="scratch: victims train from a fresh initialisation (the paper's setting); surrogate: "
                        "they train on from the surrogate's weights, e.g. with --victim-set epochs=2 (a "
                        "fine-tuning diagnostic: do the poisons move the model they were crafted against?); "
                        "each control is the surrogate trained on the clean set the same way")
    g.add_argument("--victim-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change the victims' and controls' recipe (not the surrogate's), e.g. "
                        "label_smoothing=0; repeatable. The pair's poisons are crafted once and reused "
                        "(OUT/cache), so a victim-recipe ablation costs no new crafting")
    g = ap.add_argument_group("nn_flip and label_consistent")
    g.add_argument("--seeds", type=int, default=1)
    g.add_argument("--targets", type=int, default=5, help="nn_flip: targets per seed; feature_collision: targets")
    g.add_argument("--target-class", type=int, default=4, help="nn_flip: 4 = deer; label_consistent: its target")
    g.add_argument("--adversarial-class", type=int, default=5)
    g.add_argument("--k", type=int, nargs="+", default=[250, 500, 1000])
    g.add_argument("--feature-spaces", nargs="+", default=["penultimate"], choices=["penultimate", "pixels"])
    g.add_argument("--metrics", nargs="+", default=["euclidean"], choices=["euclidean", "cosine"])
    g.add_argument("--rates", type=float, nargs="+", default=[0.5])
    g.add_argument("--amplitudes", type=float, nargs="+", default=[1.0, 32 / 255])
    g.add_argument("--surrogates", nargs="+", default=["adversarial"], choices=["adversarial", "adversarial_finetune", "clean"])
    g.add_argument("--surrogate-epochs", type=int, default=10)
    g.add_argument("--surrogate-lr", type=float, default=0.2)
    g.add_argument("--lc-eps", type=float, default=8 / 255)
    g = ap.add_argument_group("feature_collision")
    g.add_argument("--n-poisons", type=int, default=50)
    g.add_argument("--opacity", type=float, default=0.3)
    g.add_argument("--fc-steps", type=int, default=1500)
    g.add_argument("--pair-train", type=int, default=900, help="clean images per class of the paper-like binary head")
    args = ap.parse_args(argv)
    if args.clean_model is not None and args.seeds != 1:
        ap.error("--clean-model gives one clean model: use it with --seeds 1")
    if args.clean_model is not None and args.controls:
        ap.error("--controls trains a clean model per victim seed: it cannot be used with --clean-model")
    args.victim_set = _parse_victim_set(ap, args.victim_set)
    if args.victim_set and args.part != "gradient_matching":
        ap.error("--victim-set is for gradient_matching's victims")
    if args.part == "gradient_matching":  # before any model is trained, by the attack's own checks
        from poisonlab.errors import ParameterError

        try:
            _gm_attack(args)
        except ParameterError as e:
            name = str(e).split()[0]
            ap.error(f"{GM_OPTIONS.get(name, name)}: {e}")
    if not 0 <= args.first_pair < args.pairs:
        ap.error(f"--first-pair must be in [0, --pairs - 1] = [0, {args.pairs - 1}], got {args.first_pair}")
    torch.set_num_threads(args.threads)
    if args.bf16 is None:
        from poisonlab.training import use_bf16

        args.bf16 = use_bf16("auto", args.device, 32)
    if args.part == "label_consistent" and args.target_class == 4 and "--target-class" not in (argv or sys.argv):
        args.target_class = 0  # Turner et al. poison class 0 (airplane)
    bench = Bench(Path(args.out), args.part, list(argv if argv is not None else sys.argv[1:]))
    PARTS[args.part](args, bench)
    bench.add({"event": "end", "load": os.getloadavg()})


if __name__ == "__main__":
    main()
