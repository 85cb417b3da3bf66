"""Training variants: which training inputs (subset rule) × how to train (regime).

DESIGN.md, "Variants". A variant is named ``<rule>[_n<N>][+<regime>]``:

- ``baseline``: every training input (the seed workflow's "original" models);
- ``corner_cases_n<N>``: without the N training inputs ranked most surprising by DSA, pooled over
  the baseline models (Ouyang et al.; the seed workflow's "retrained" models);
- ``random_n<N>``: without N inputs drawn uniformly at random — the control; a fresh draw for each
  model seed, so the control's spread over seeds includes the choice of subset;
- ``least_surprising_n<N>``: without the N lowest-DSA inputs (the opposite end of the ranking);
- ``random_class_matched_n<N>``: random removal with the class histogram of ``corner_cases_n<N>``,
  so that class balance cannot explain a difference from the corner-case variant;
- ``+pgd_at`` / ``+sep`` / ``+sep_sharp``: the same subset trained with PGD adversarial training or
  the explanation-smoothness penalty of Chen et al. (``regimes.py``) with the flattening weight
  ``sep_reg_weight`` (> 0) or the sharpening weight ``sep_sharp_reg_weight`` (< 0), so both signs can
  be variants of one config; ``standard`` (cross-entropy) is the default.

The config lists ``variants`` as ``rule[+regime]`` and the doses as ``remove_counts``; every removal
rule runs at every dose. Baseline (standard) is always part of the plan: DSA ranks the training
inputs with its models and every comparison pairs with it.

This module imports no torch, so config validation can use it cheaply.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

RULES = ("baseline", "corner_cases", "random", "least_surprising", "random_class_matched")
REMOVAL_RULES = RULES[1:]
DSA_RULES = ("corner_cases", "least_surprising", "random_class_matched")  # need cc_remove's ranking
REGIMES = ("standard", "pgd_at", "sep", "sep_sharp")  # sep: flattening weight; sep_sharp: sharpening

_NAME = re.compile(r"^(?P<rule>[a-z_]+?)(_n(?P<n>\d+))?(\+(?P<regime>[a-z_]+))?$")


class VariantError(ValueError):
    """A variant name or spec that cannot be read; the message says what was expected."""


@dataclass(frozen=True, order=True)
class Variant:
    rule: str
    n_remove: int = 0
    regime: str = "standard"

    @property
    def name(self) -> str:
        base = self.rule if self.rule == "baseline" else f"{self.rule}_n{self.n_remove}"
        return base if self.regime == "standard" else f"{base}+{self.regime}"

    @property
    def needs_dsa(self) -> bool:
        return self.rule in DSA_RULES

    @property
    def subset(self) -> str:
        """Key of the removed-index list in ``subsets.json`` (regime-independent)."""
        return "baseline" if self.rule == "baseline" else f"{self.rule}_n{self.n_remove}"

    def __str__(self) -> str:
        return self.name


BASELINE = Variant("baseline")


def parse_variant_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``["baseline", "corner_cases+pgd_at", ...]`` → ``[(rule, regime), ...]``."""
    out = []
    for spec in specs:
        if not isinstance(spec, str):
            raise VariantError(f"expected strings rule[+regime], got {spec!r}")
        rule, _, regime = spec.partition("+")
        regime = regime or "standard"
        if rule not in RULES:
            raise VariantError(f"unknown subset rule {rule!r} in {spec!r}; expected one of {list(RULES)}")
        if regime not in REGIMES:
            raise VariantError(f"unknown regime {regime!r} in {spec!r}; expected one of {list(REGIMES)}")
        if (rule, regime) in out:
            raise VariantError(f"{spec!r} is listed twice")
        out.append((rule, regime))
    if not out:
        raise VariantError("expected at least one variant")
    return out


def seed_workflow_count(cfg: dict, n_train: int | None = None) -> int:
    """N of ``python main.py -is_retrain True``: ``remove_count``, or ``remove_fraction`` × n_train."""
    if cfg["remove_count"] > 0:
        return cfg["remove_count"]
    n = int(round(cfg["remove_fraction"] * n_train)) if n_train else 0
    if n < 1:
        raise VariantError("remove_count is 0 and remove_fraction selects no training input")
    return n


def doses(cfg: dict, n_train: int | None = None) -> list[int]:
    """The removal counts N: ``remove_counts``, or the seed workflow's single count when it is empty."""
    if cfg["remove_counts"]:
        return sorted(set(cfg["remove_counts"]))
    return [seed_workflow_count(cfg, n_train)]


def plan(cfg: dict, n_train: int | None = None) -> list[Variant]:
    """Every variant of the config: baseline first, then each rule × dose × regime in config order."""
    out = [BASELINE]
    ns = None
    for rule, regime in parse_variant_specs(cfg["variants"]):
        if rule == "baseline":
            candidates = [Variant("baseline", 0, regime)]
        else:
            ns = ns if ns is not None else doses(cfg, n_train)
            candidates = [Variant(rule, n, regime) for n in ns]
        out += [v for v in candidates if v not in out]
    return out


def parse_variant_name(name: str) -> Variant:
    """``"random_n100+pgd_at"`` → ``Variant("random", 100, "pgd_at")``."""
    m = _NAME.match(name)
    if not m or m["rule"] not in RULES or (m["regime"] or "standard") not in REGIMES:
        raise VariantError(f"variant {name!r}: expected <rule>[_n<N>][+<regime>] with rule in {list(RULES)} "
                           f"and regime in {list(REGIMES)}")
    rule, n = m["rule"], int(m["n"] or 0)
    if (rule == "baseline") != (n == 0):
        raise VariantError(f"variant {name!r}: baseline takes no _n<N>; a removal rule needs one (N >= 1)")
    return Variant(rule, n, m["regime"] or "standard")


# ---------------------------------------------------------------------------------------------
# subset rules: which training indices each removal variant drops
# ---------------------------------------------------------------------------------------------
def draw_seed(rule: str, n_remove: int, model_seed: int) -> int:
    """Seed of a random removal draw: fixed by (rule, N, model seed), recorded in subsets.json."""
    digest = hashlib.sha256(f"{rule}:{n_remove}:{model_seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def random_removal(n_train: int, n_remove: int, seed: int) -> np.ndarray:
    """N indices drawn uniformly without replacement from ``range(n_train)``, sorted."""
    if not 0 < n_remove < n_train:
        raise VariantError(f"cannot remove {n_remove} of {n_train} training inputs")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_train, size=n_remove, replace=False))


def class_matched_removal(labels: np.ndarray, reference: np.ndarray, seed: int) -> np.ndarray:
    """Random removal with the class histogram of the ``reference`` removed set: for each class c,
    as many inputs of class c as ``reference`` holds, drawn uniformly from that class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[reference]):
        want = int((labels[reference] == c).sum())
        pool = np.flatnonzero(labels == c)
        if want > len(pool):
            raise VariantError(f"class {c}: {want} to remove but only {len(pool)} training inputs")
        chosen.append(rng.choice(pool, size=want, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def ranked_removal(ranking: np.ndarray, n_remove: int) -> np.ndarray:
    """The first N of a ranking (most surprising first for corner cases, least for the opposite)."""
    if not 0 < n_remove < len(ranking):
        raise VariantError(f"cannot remove {n_remove} of {len(ranking)} training inputs")
    return np.sort(np.asarray(ranking[:n_remove], dtype=np.int64))


def removal_sets(variants: list[Variant], seeds: list[int], n_train: int, labels: np.ndarray | None = None,
                 surprise_ranking: np.ndarray | None = None) -> dict[str, dict]:
    """Removed indices of every removal subset in ``variants``, per model seed.

    ``surprise_ranking``: training indices from most to least surprising (pooled DSA over the
    baseline models, ``cc_remove.choose_corner_cases``); needed by the DSA rules. Returns
    ``{subset: {"rule", "n_remove", "per_seed": {seed: {"removed": [...], "draw_seed": s | None}}}}``.
    """
    out: dict[str, dict] = {}
    for v in variants:
        if v.rule == "baseline" or v.subset in out:
            continue
        if v.needs_dsa and surprise_ranking is None:
            raise VariantError(f"{v.name} needs the DSA ranking of cc_remove.py")
        per_seed = {}
        for seed in seeds:
            ds = None
            if v.rule == "corner_cases":
                removed = ranked_removal(surprise_ranking, v.n_remove)
            elif v.rule == "least_surprising":
                removed = ranked_removal(surprise_ranking[::-1], v.n_remove)
            elif v.rule == "random":
                ds = draw_seed(v.rule, v.n_remove, seed)
                removed = random_removal(n_train, v.n_remove, ds)
            else:  # random_class_matched
                if labels is None:
                    raise VariantError(f"{v.name} needs the training labels")
                ds = draw_seed(v.rule, v.n_remove, seed)
                removed = class_matched_removal(labels, ranked_removal(surprise_ranking, v.n_remove), ds)
            per_seed[str(seed)] = {"removed": removed.tolist(), "draw_seed": ds}
        out[v.subset] = {"rule": v.rule, "n_remove": v.n_remove, "per_seed": per_seed}
    return out
