"""One run: load data -> poison -> attacked model (cached) -> evaluate -> defend -> evaluate -> row.

:func:`plan` turns user choices into a validated :class:`Experiment` (every name and parameter
is checked before anything runs or is written); :class:`Runner` executes experiments and
writes one Parquet row each. The core owns evaluation: defenses never see the test sets.
"""
from __future__ import annotations

import hashlib
import json
import resource
import sys
import time
import traceback
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import attrs
import torch

import bdbench
from bdbench import data as bddata
from bdbench import resources as bdresources
from bdbench.cache import TensorCache, default_cache_dir
from bdbench.calibration import CALIBRATIONS
from bdbench.components import Attack, Defense, DefenseData, Evaluation, ImageSet, Metric, PoisonedSet
from bdbench.context import Reporter, RunContext
from bdbench.errors import AttackFailedError, BdbenchError, CacheError, ParameterError
from bdbench.nn import NormalizedModel, clone
from bdbench.params import canonical_json, make_config
from bdbench.plugins import PluginSet
from bdbench.presets import get_preset
from bdbench.results import COLUMNS, write_row
from bdbench.training import Recipe, fit, predict

STANDARD_STAGE = ("acc", "asr", "ra")
STANDARD_DERIVED = ("arr", "rdr", "der", "lcr")


@attrs.frozen(kw_only=True)
class Experiment:
    """Everything that determines a run's result; its key is the hash of its canonical JSON."""

    preset: str
    dataset: str
    model: str
    model_params: str  # canonical JSON of the resolved parameters
    attack: str
    attack_params: str
    poison_ratio: float
    target: int
    seed: int
    recipe: str
    train_subset: int | None
    test_subset: int | None
    defense: str
    defense_params: str
    spc: int | None
    clean_ratio: float | None
    source: str | None  # None: the defense takes no clean data
    calibrate: str | None = None
    calibrate_params: str | None = None  # canonical JSON of the calibration's resolved parameters

    def key(self) -> str:
        fields = attrs.asdict(self, recurse=False)
        if fields["calibrate_params"] is None:  # added later: runs without calibration keep their keys
            del fields["calibrate_params"]
        return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:32]

    def attack_half(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("dataset", "model", "model_params", "attack", "attack_params",
                                              "poison_ratio", "target", "seed", "recipe", "train_subset")}


def plan(plugins: PluginSet, *, defense: str, preset: str = "quick", dataset: str | None = None,
         model: str | None = None, attack: str = "badnets", attack_params: Mapping[str, Any] | None = None,
         defense_params: Mapping[str, Any] | None = None, model_params: Mapping[str, Any] | None = None,
         poison_ratio: float = 0.1, target: int = 0, seed: int = 0, spc: int | None = 100,
         clean_ratio: float | None = None, source: str = "seen", calibrate: str | None = None,
         calibrate_params: Mapping[str, Any] | None = None) -> Experiment:
    """Validate the choices and build the :class:`Experiment` (nothing is loaded or trained).

    A defense that takes no clean data (data-free, or given the poisoned training set) has no
    data budget, source or calibration: they are validated, then recorded as null, so a grid
    over ``spc`` runs such a defense once.
    """
    p = get_preset(preset)
    dataset, model = dataset or p.dataset, model or p.model
    ds_cls = plugins.get("dataset", dataset).cls
    model_cls = plugins.get("model", model).cls
    attack_cls = plugins.get("attack", attack).cls
    defense_cls = plugins.get("defense", defense).cls
    if not 0 < poison_ratio <= 1:
        raise ParameterError(f"poison ratio must be in (0, 1], got {poison_ratio}")
    if not 0 <= target < ds_cls.num_classes:
        raise ParameterError(f"target {target} is outside {dataset}'s labels 0..{ds_cls.num_classes - 1}")
    if spc is not None and clean_ratio is not None:
        raise ParameterError("give either --spc or --clean-ratio, not both")
    bddata.Budget(spc=spc, clean_ratio=clean_ratio)
    bddata.get_source(source)
    if calibrate not in (None, "none", *CALIBRATIONS):
        raise ParameterError(f"unknown calibration {calibrate!r} (known: none, {', '.join(CALIBRATIONS)})")
    calibration = None
    if calibrate in (None, "none"):
        if calibrate_params:
            raise ParameterError("calibration parameters given without a calibration (--calibrate)")
    else:
        calibration = canonical_json(make_config(CALIBRATIONS[calibrate], calibrate_params,
                                                 owner=f"calibration {calibrate!r}"))
    if "clean" not in defense_cls.needs:  # data-free, or the poisoned training set: no budget, source or calibration
        spc, clean_ratio, source, calibrate, calibration = None, None, None, None, None
    mparams = dict(p.model_params) if model == p.model else {}
    mparams.update(model_params or {})
    return Experiment(
        preset=p.name, dataset=dataset, model=model,
        model_params=canonical_json(make_config(model_cls.Config, mparams, owner=f"model {model!r}")),
        attack=attack,
        attack_params=canonical_json(make_config(attack_cls.Config, attack_params, owner=f"attack {attack!r}")),
        poison_ratio=float(poison_ratio), target=int(target), seed=int(seed),
        recipe=canonical_json(p.recipe), train_subset=p.train_subset if dataset == p.dataset else None,
        test_subset=p.test_subset if dataset == p.dataset else None,
        defense=defense,
        defense_params=canonical_json(make_config(defense_cls.Config, defense_params, owner=f"defense {defense!r}")),
        spc=spc, clean_ratio=clean_ratio, source=source,
        calibrate=None if calibrate in (None, "none") else calibrate, calibrate_params=calibration)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@attrs.define
class Stage:
    """The attacked model and what the defense stage needs, shared by runs with one attack key."""

    model: torch.nn.Module
    attack: Attack
    full_train: ImageSet
    split: bddata.Split
    poisoned: PoisonedSet
    before: dict[str, float]
    seconds: float
    cached: bool
    prepare_seconds: float = 0.0


def attack_key(plugins: PluginSet, exp: Experiment) -> str:
    """The attacked model's cache key: its half of the experiment and the plugin versions."""
    versions = {k: plugins.get(k, getattr(exp, k)).version for k in ("dataset", "model", "attack")}
    payload = canonical_json({"experiment": exp.attack_half(), "versions": versions, "bdbench": bdbench.__version__})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


class Runner:
    """Executes experiments; keeps loaded datasets and attacked models in memory between runs."""

    def __init__(self, plugins: PluginSet, *, out_dir: Path | str = "bdbench-results",
                 cache_dir: Path | str | None = None, device: str | torch.device = "cpu",
                 data_dir: Path | str | None = None, reporter: Reporter | None = None) -> None:
        self.plugins = plugins
        self.out_dir = Path(out_dir)
        self.cache = TensorCache(Path(cache_dir) if cache_dir else default_cache_dir(), "models")
        self.attack_states = TensorCache(self.cache.root.parent, "attack-states")  # Attack.state_dict()
        self.device = torch.device(device)
        self.data_dir = Path(data_dir) if data_dir else None
        self.reporter = reporter or Reporter()
        self._data: dict[tuple[str, str], ImageSet] = {}
        self._stages: dict[str, Stage] = {}

    # -- data -----------------------------------------------------------------------------------
    def load(self, dataset: str, split: str) -> ImageSet:
        if (dataset, split) not in self._data:
            builder = self.plugins.create("dataset", dataset)
            self._data[(dataset, split)] = builder.load(split, self.data_dir)
        return self._data[(dataset, split)]

    def _subset(self, data: ImageSet, size: int | None, seed: int) -> ImageSet:
        if size is None or size >= len(data):
            return data
        g = torch.Generator().manual_seed(seed)
        _, picked = bddata.stratified_split(data.labels, size / len(data), g)
        return data.subset(picked)

    def context(self, exp: Experiment) -> RunContext:
        info = self.plugins.create("dataset", exp.dataset).info()
        recipe = Recipe(**json.loads(exp.recipe))
        recipe = attrs.evolve(recipe, hflip=recipe.hflip and info.hflip)
        ctx = RunContext(dataset=info, device=self.device, seed=exp.seed, cache_dir=self.cache.root.parent,
                         reporter=self.reporter, batch_size=recipe.batch_size, recipe=recipe,
                         poison_ratio=exp.poison_ratio, target=exp.target)
        ctx.model_factory = lambda: self.build_model(exp, ctx)
        return ctx

    # -- the attacked model -----------------------------------------------------------------------
    def attack_key(self, exp: Experiment) -> str:
        return attack_key(self.plugins, exp)

    def build_model(self, exp: Experiment, ctx: RunContext) -> torch.nn.Module:
        builder = self.plugins.get("model", exp.model).cls(
            make_config(self.plugins.get("model", exp.model).cls.Config, json.loads(exp.model_params)))
        net = builder.build(ctx.dataset.num_classes, ctx.dataset.image_shape)
        return NormalizedModel(net, ctx.dataset.mean, ctx.dataset.std).to(self.device)

    def attacked(self, exp: Experiment) -> Stage:
        key = self.attack_key(exp)
        if key in self._stages:  # trained or loaded by an earlier run of this runner
            return attrs.evolve(self._stages[key], seconds=0.0, cached=True, prepare_seconds=0.0)
        ctx = self.context(exp)
        train = self._subset(self.load(exp.dataset, "train"), exp.train_subset, seed=exp.seed)
        split = bddata.reserve(train.labels, ctx.generator("reserve"))
        attack_train = train.subset(split.train)
        attack: Attack = self.plugins.get("attack", exp.attack).cls(
            make_config(self.plugins.get("attack", exp.attack).cls.Config, json.loads(exp.attack_params)))
        start = time.perf_counter()  # resources, poisoning and training all count as the attack's time
        attack.prepare(ctx.dataset, attack_train, ctx)
        poisoned_local = attack.poison(attack_train, exp.poison_ratio, exp.target, ctx.dataset.num_classes,
                                       ctx.generator("poison"))
        # indices of the poisoned samples in `train` (the defender's pools are drawn from it)
        poisoned = PoisonedSet(split.train[poisoned_local.indices], poisoned_local.images, poisoned_local.labels)
        prepare_seconds = time.perf_counter() - start
        model = self.build_model(exp, ctx)
        cached = False
        if self.cache.has(key):
            try:
                state, _ = self.cache.load(key)
                model.load_state_dict(state)
                self._load_attack_state(key, attack)
                cached = True
            except (CacheError, RuntimeError) as exc:
                print(f"bdrun: warning: {str(exc).splitlines()[0]}; retraining", file=sys.stderr)
                self.cache.discard(key)
                self.attack_states.discard(key)
                model = self.build_model(exp, ctx)
        if not cached:
            torch.manual_seed(exp.seed)
            model = self.build_model(exp, ctx)
            if attack.threat_model == "training-control":
                attack.train(model, attack_train, poisoned_local, ctx)
            else:
                fit(model, poisoned_local.merge(attack_train), ctx.recipe, ctx, description=f"training {exp.attack}")
            attack_state = attack.state_dict()
            if attack_state:  # saved before the model: a model entry implies its attack state
                self.attack_states.save(key, attack_state, {"attack_half": exp.attack_half()})
            self.cache.save(key, model.state_dict(), {"attack_half": exp.attack_half(),
                                                      "seconds": time.perf_counter() - start})
        seconds = time.perf_counter() - start
        model.eval()
        stage = Stage(model, attack, train, split, poisoned, self.evaluate(model, attack, exp), seconds, cached,
                      prepare_seconds)
        self._stages = {key: stage}  # keep one: a grid sorts runs by attack key
        return stage

    def _load_attack_state(self, key: str, attack: Attack) -> None:
        """Restore the attack's learned state (:meth:`Attack.state_dict`) cached with model ``key``."""
        if not attack.state_dict():
            return
        if not self.attack_states.has(key):
            raise CacheError(f"attack state for cached model {key} is missing")
        state, _ = self.attack_states.load(key)
        attack.load_state_dict(state)

    # -- evaluation ---------------------------------------------------------------------------------
    def test_sets(self, exp: Experiment, attack: Attack) -> tuple[ImageSet, ImageSet, torch.Tensor]:
        test = self._subset(self.load(exp.dataset, "test"), exp.test_subset, seed=0)
        eligible = attack.eligible_test(test.labels, exp.target)
        bd = test.subset(eligible.nonzero().flatten())
        num_classes = self.plugins.get("dataset", exp.dataset).cls.num_classes
        return test, bd, attack.backdoor_labels(bd.labels, exp.target, num_classes)

    def evaluate(self, model: torch.nn.Module, attack: Attack, exp: Experiment) -> dict[str, float]:
        test, bd, bd_target = self.test_sets(exp, attack)

        def trigger(x: torch.Tensor) -> torch.Tensor:
            return attack.apply(x, None)

        ev = Evaluation(
            clean_pred=predict(model, test.images, device=self.device),
            clean_true=test.labels,
            bd_pred=predict(model, bd.images, device=self.device, transform=trigger),
            bd_true=bd.labels, bd_target=bd_target,
            model=model, clean=test, bd_source=bd, trigger=trigger, device=self.device)
        out: dict[str, float] = {}
        for info in self.plugins.list("metric"):
            out.update(info.cls().compute(ev))
        return out

    def derive(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for info in self.plugins.list("metric"):
            out.update(info.cls().derive(before, after))
        return out

    # -- a run ----------------------------------------------------------------------------------------
    def defender_data(self, exp: Experiment, defense: Defense, stage: Stage, ctx: RunContext) -> DefenseData:
        needs = defense.needs
        num_classes, shape = ctx.dataset.num_classes, ctx.dataset.image_shape
        kwargs: dict[str, Any] = {}
        if "clean" in needs:
            clean, val = bddata.defender_data(
                stage.full_train, stage.split, stage.poisoned.mask(len(stage.full_train)),
                bddata.Budget(spc=exp.spc, clean_ratio=exp.clean_ratio), bddata.get_source(exp.source),
                with_val=defense.uses_validation, generator=ctx.generator("defender-data"), info=ctx.dataset)
            if exp.calibrate is not None:
                clean, val = self.calibrated(exp, stage, clean, val, defense.uses_validation)
            kwargs.update(clean=clean, val=val)
        if "poisoned_train_set" in needs:
            kwargs["poisoned_train"] = stage.poisoned.merge(stage.full_train).subset(stage.split.train)
        if "trigger_oracle" in needs:
            kwargs["trigger"] = lambda x: stage.attack.apply(x, None)
        if "target_label" in needs:
            kwargs["target"] = exp.target
        if "trigger_hint" in needs:
            kwargs["trigger_hint"] = stage.attack.trigger_hint(shape) or (0, 0, shape[1], shape[2])
        return DefenseData(num_classes=num_classes, image_shape=shape, **kwargs)

    def calibrated(self, exp: Experiment, stage: Stage, clean: ImageSet, val: ImageSet,
                   with_val: bool) -> tuple[ImageSet, ImageSet]:
        """The defender's data after ``exp.calibrate``, cached per victim model and auxiliary set."""
        method = make_config(CALIBRATIONS[exp.calibrate], json.loads(exp.calibrate_params or "{}"))
        payload = {"victim": self.attack_key(exp), "source": exp.source, "spc": exp.spc,
                   "clean_ratio": exp.clean_ratio, "seed": exp.seed, "with_val": with_val,
                   "method": exp.calibrate, "params": canonical_json(method)}

        def build():
            c = method.calibrate(stage.model, clean, self.device)
            v = method.calibrate(stage.model, val, self.device)
            return {"clean": c.images, "clean_labels": c.labels, "val": v.images, "val_labels": v.labels}, {}

        ctx = RunContext(dataset=self.plugins.create("dataset", exp.dataset).info(), cache_dir=self.cache.root.parent)
        t, _ = bdresources.cached(ctx, "calibration", payload, build)
        return ImageSet(t["clean"], t["clean_labels"]), ImageSet(t["val"], t["val_labels"])

    def run(self, exp: Experiment, *, raise_errors: bool = True) -> dict[str, Any]:
        """Execute ``exp`` and write its row; returns the row.

        With ``raise_errors`` (single runs), invalid input (:class:`BdbenchError` while loading
        data or preparing the attack) is raised before anything is written, and a failure after
        that is recorded as a row with status ``failed``, then re-raised. Without it (grids),
        every failure is a ``failed`` row and the run returns it.
        """
        started = datetime.now(timezone.utc)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        row = self._base_row(exp, started)
        try:
            stage = self.attacked(exp)
        except Exception as exc:
            if raise_errors and isinstance(exc, BdbenchError):  # bad input: nothing is written
                raise
            return self._fail(row, exc, raise_errors)
        row.update(attack_seconds=stage.seconds, attack_prepare_seconds=stage.prepare_seconds, attack_cached=stage.cached, poison_count=len(stage.poisoned),
                   **{f"{k}_before": stage.before.get(k) for k in STANDARD_STAGE})
        try:
            self._check_attack(exp, stage)
            defense: Defense = self.plugins.get("defense", exp.defense).cls(
                make_config(self.plugins.get("defense", exp.defense).cls.Config, json.loads(exp.defense_params)))
            ctx = self.context(exp)
            data = self.defender_data(exp, defense, stage, ctx)
            row.update(defense_needs=",".join(sorted(defense.needs)),
                       clean_count=len(data.clean) if data.clean is not None else None,
                       val_count=len(data.val) if data.val is not None else None)
            torch.manual_seed(exp.seed)
            start = time.perf_counter()
            result = defense.purify(clone(stage.model), data, ctx)
            row["defense_seconds"] = time.perf_counter() - start
            after = self.evaluate(result.model, stage.attack, exp)
            derived = self.derive(stage.before, after)
            extra = {f"{k}_before": v for k, v in stage.before.items() if k not in STANDARD_STAGE}
            extra.update({f"{k}_after": v for k, v in after.items() if k not in STANDARD_STAGE})
            extra.update({k: v for k, v in derived.items() if k not in STANDARD_DERIVED})
            row.update({f"{k}_after": after.get(k) for k in STANDARD_STAGE})
            row.update({k: derived.get(k) for k in STANDARD_DERIVED})
            row.update(status="ok", extra_metrics=canonical_json(extra),
                       defense_diagnostics=canonical_json(result.diagnostics))
        except AttackFailedError as exc:
            row.update(status="attack_failed", error=str(exc))
        except Exception as exc:
            return self._fail(row, exc, raise_errors)
        return self._finish(row)

    def _fail(self, row: dict[str, Any], exc: Exception, reraise: bool) -> dict[str, Any]:
        message = str(exc).splitlines()[0] if str(exc) else ""
        row.update(status="failed", error=f"{type(exc).__name__}: {message}")
        full = self._finish(row)
        if not isinstance(exc, BdbenchError):
            traceback.print_exc(file=sys.stderr)
        if reraise:
            raise exc
        return full

    def _check_attack(self, exp: Experiment, stage: Stage) -> None:
        preset = get_preset(exp.preset)
        k = self.plugins.get("dataset", exp.dataset).cls.num_classes
        acc, asr = stage.before.get("acc", 0.0), stage.before.get("asr", 0.0)
        if acc < 1 / k + preset.chance_margin:
            raise AttackFailedError(f"attacked model's clean accuracy {acc:.3f} is near chance (1/{k})")
        if exp.attack != "none" and asr < preset.attack_floor:
            raise AttackFailedError(f"attack {exp.attack!r} reached ASR {asr:.3f}, under the {exp.preset} "
                                    f"preset's floor {preset.attack_floor}")

    def _base_row(self, exp: Experiment, started: datetime) -> dict[str, Any]:
        row: dict[str, Any] = {
            "run_key": exp.key(), "status": "failed", "started_at": started,
            "preset": exp.preset, "dataset": exp.dataset, "model": exp.model, "model_params": exp.model_params,
            "attack": exp.attack, "attack_params": exp.attack_params, "poison_ratio": exp.poison_ratio,
            "target": exp.target, "seed": exp.seed, "recipe": exp.recipe, "defense": exp.defense,
            "defense_params": exp.defense_params, "spc": exp.spc, "clean_ratio": exp.clean_ratio,
            "source": exp.source, "calibrate": exp.calibrate,
            "calibrate_params": exp.calibrate_params, "device": str(self.device),
            "bdbench_version": bdbench.__version__, "torch_version": torch.__version__,
        }
        for kind in ("dataset", "model", "attack", "defense"):
            info = self.plugins.get(kind, getattr(exp, kind))
            row[f"{kind}_plugin"], row[f"{kind}_plugin_version"] = info.distribution, info.version
        metrics = self.plugins.list("metric")
        row["metric_plugin"] = ",".join(sorted({m.distribution for m in metrics}))
        row["metric_plugin_version"] = ",".join(sorted({f"{m.distribution}=={m.version}" for m in metrics}))
        return row

    def _finish(self, row: dict[str, Any]) -> dict[str, Any]:
        row["finished_at"] = datetime.now(timezone.utc)
        row["peak_memory_mb"] = _peak_memory_mb(self.device)
        full = {name: row.get(name) for name in COLUMNS}
        full["path"] = str(write_row(full, self.out_dir, self.plugins.snapshot()))
        row.update(full)
        return full
