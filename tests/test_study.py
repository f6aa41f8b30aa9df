"""`roe study`: the paired statistics on synthetic data with known answers, the report's structure, resumption
(interrupted by --max-units, then rerun: finished units are not recomputed), and settings as part of the keys.
Tiny runs only (the built-in `s` model, a few items and trials)."""

import json
import math

import numpy as np
import pytest

from roe import study
from roe.cli import main
from roe.stats import paired_difference, verdict
from roe.study_report import PLOTS


# ---- statistics on synthetic data ---------------------------------------------------------------------------
def _binary_pair(rng, n, seeds, p_up, p_down):
    """base items 0/1; RoE flips an item up with p_up (from 0) and down with p_down (from 1), per seed."""
    base = rng.integers(0, 2, n)
    u = rng.random((n, seeds))
    roe = np.where(base[:, None] == 0, (u < p_up).astype(float), (u >= p_down).astype(float))
    return roe, base


def test_no_true_difference_gives_no_evidence_in_most_seeds():
    verdicts = []
    for s in range(40):
        roe, base = _binary_pair(np.random.default_rng(s), 150, 3, 0.1, 0.1)  # symmetric flips: true difference 0
        verdicts.append(paired_difference(roe, base, n_resamples=1000, seed=s)["verdict"])
    assert verdicts.count("no evidence") >= 34, verdicts  # about 95% expected at level 0.95


def test_large_true_difference_gives_helps_and_hurts():
    for s in range(5):
        rng = np.random.default_rng(100 + s)
        roe, base = _binary_pair(rng, 150, 3, 0.6, 0.05)
        assert paired_difference(roe, base, n_resamples=1000, seed=s)["verdict"] == "helps"
        roe, base = _binary_pair(rng, 150, 3, 0.05, 0.6)
        assert paired_difference(roe, base, n_resamples=1000, seed=s)["verdict"] == "hurts"


def test_interval_covers_the_true_mean():
    true, covered = 0.3, 0
    for s in range(40):
        rng = np.random.default_rng(200 + s)
        base = rng.normal(0, 1, 80)
        roe = base[:, None] + true + rng.normal(0, 1, (80, 1)) + rng.normal(0, 0.2, (80, 4))
        d = paired_difference(roe, base, n_resamples=1000, seed=s)
        covered += d["ci_low"] <= true <= d["ci_high"]
        assert d["ci_low"] <= d["mean"] <= d["ci_high"]
    assert covered >= 34, covered


def test_weighted_difference_is_the_log_perplexity_difference_and_lower_is_better():
    rng = np.random.default_rng(7)
    tokens = rng.integers(5, 40, 60).astype(float)
    base = tokens * 1.2 + rng.normal(0, 1, 60)  # summed negative log-probs per document
    roe = base[:, None] - 0.1 * tokens[:, None] + rng.normal(0, 0.3, (60, 3))  # RoE: 0.1 nats/token lower
    d = paired_difference(roe, base, tokens, higher_is_better=False, n_resamples=1000)
    log_ppl = lambda nll: nll.sum() / tokens.sum()  # noqa: E731
    assert d["mean"] == pytest.approx(log_ppl(roe.mean(axis=1)) - log_ppl(base))
    assert d["verdict"] == "helps" and d["ci_high"] < 0
    assert paired_difference(base + 0.1 * tokens, base, tokens, higher_is_better=False)["verdict"] == "hurts"


def test_degenerate_and_bad_input():
    d = paired_difference([1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert (d["mean"], d["ci_low"], d["ci_high"], d["verdict"]) == (0.0, 0.0, 0.0, "no evidence")
    assert verdict(0.01, 0.2, True) == "helps" and verdict(0.01, 0.2, False) == "hurts"
    assert verdict(-0.1, 0.2, True) == "no evidence"
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="level"):
        paired_difference([1.0, 0.0], [0.0, 0.0], level=95)


# ---- the whole command on the built-in s model --------------------------------------------------------------
ARGS = ["study", "--model", "builtin:s", "--tasks", "ppl,code", "--trials", "2", "--val-examples", "3",
        "--test-examples", "3", "--seeds", "2", "-k", "2", "--ks", "2", "--bench-tokens", "2", "--bench-repeats", "1",
        "--bootstrap-resamples", "200", "--no-progress"]
# units: per task 2 trials + (base + 1 K x 2 seeds) evaluations + 1 cost measurement (every K)
TRIALS, EVALS, COSTS = 4, 6, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Interrupted after 5 units, resumed, rerun once more complete; evaluations counted in each run."""
    out = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    counts, real = [], study.score_items

    def counting(*a, **kw):
        counts[-1] += 1
        return real(*a, **kw)

    mp.setattr(study, "score_items", counting)
    rcs, reports = [], []
    try:
        for extra in (["--max-units", "5"], [], [], ["--seeds", "3"]):
            counts.append(0)
            rcs.append(main([*ARGS, "-o", str(out), *extra]))
            path = out / "study.json"
            reports.append(json.loads(path.read_text()) if path.exists() else None)
            if path.exists():
                path.unlink()
    finally:
        mp.undo()
    return out, rcs, counts, reports


def test_resumes_without_redoing_finished_units(runs):
    out, rcs, counts, reports = runs
    total = TRIALS + EVALS + COSTS
    assert rcs[:3] == [3, 0, 0]  # 3: stopped at --max-units
    assert reports[0] is None  # no report from an unfinished study
    state = json.loads((out / "state.json").read_text())
    assert reports[1]["units"] == {"computed": total - 5, "reused": 5}
    # the first 5 units are ppl's 2 trials and 3 of its evaluations: the rerun evaluates only the rest
    assert counts[:2] == [3, EVALS - 3]
    assert reports[2]["units"] == {"computed": 0, "reused": total} and counts[2] == 0
    assert len(state["units"]) >= total
    # the results of the resumed run are those of the complete rerun (nothing recomputed differently)
    assert reports[1]["tasks"]["ppl"]["comparison"]["roe"][0]["difference"] == \
        reports[2]["tasks"]["ppl"]["comparison"]["roe"][0]["difference"]


def test_changed_setting_reuses_only_what_it_does_not_change(runs):
    _, rcs, counts, reports = runs
    assert rcs[3] == 0
    # a third seed: one new RoE evaluation per task; trials, the other evaluations and the costs are reused
    assert counts[3] == 2 and reports[3]["units"]["computed"] == 2
    assert reports[3]["tasks"]["code"]["comparison"]["roe"][0]["seeds"] == 3


def test_report_structure(runs):
    out, _, _, reports = runs
    r = reports[2]
    assert {"tasks", "tuning", "units", "ks", "model", "settings", "versions", "command", "device"} <= set(r)
    for name in ("ppl", "code"):
        c = r["tasks"][name]["comparison"]
        assert c["n"] == 3 and c["base"]["cost"]["tokens_per_s"] > 0
        roe = c["roe"][0]
        assert roe["k"] == 2 and roe["seeds"] == 2 and len(roe["per_seed"]) == 2
        assert {"mean", "ci_low", "ci_high", "level", "verdict"} <= set(roe["difference"])
        assert roe["difference"]["verdict"] in ("helps", "no evidence", "hurts")
        assert roe["cost"]["kv_cache_bytes"] > 0 and roe["cost"]["peak_mem_bytes"] > 0
        t = r["tuning"][name]
        assert len(t["trials"]) == 2 and t["trials"][0]["tau"] == [0.0] * 4  # the first trial is the base model
        assert len(t["tau"]) == 4 and t["tau"][0] == t["tau"][-1] == 0.0  # skipped layers stay clean
    assert r["tasks"]["ppl"]["comparison"]["higher_is_better"] is False
    md = (out / "study.md").read_text()
    for section in ("## Does RoE help?", "## Quality vs K", "## Tuning", "## Quality vs cost"):
        assert section in md
    for png in PLOTS:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_eval_ppl_details_match_perplexity():
    from roe.evaluate import eval_ppl, load_items
    from roe.roster import RosterOfExperts

    r = RosterOfExperts.from_pretrained("builtin:s")
    items = load_items("ppl", "validation", 3)
    res = eval_ppl(r, items)
    assert res.value == pytest.approx(r.perplexity([x["text"] for x in items]), rel=1e-6)
    nll = sum(d["nll"] for d in res.details) / sum(d["tokens"] for d in res.details)
    assert math.exp(nll) == pytest.approx(res.value)


@pytest.mark.parametrize("extra, message", [
    (["--file", "nope"], "CATEGORY=PATH"),
    (["--ks", "4"], "--ks"),
    (["--trials", "x"], "--trials"),
    (["--tune", "noise"], "--tune"),
])
def test_bad_flags_are_one_line_errors(extra, message, capsys, tmp_path):
    assert main([*ARGS, "-o", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_adaptive_threshold_is_tunable_exactly_when_the_config_has_it():
    from roe.config import RoEConfig

    if "adaptive_threshold" in RoEConfig.__dataclass_fields__:
        assert study.tuned_parameters("tau,adaptive_threshold") == ["tau", "adaptive_threshold"]
    else:
        with pytest.raises(ValueError, match="adaptive K is not in this version"):
            study.tuned_parameters("tau,adaptive_threshold")


def test_per_item_lm_eval_samples():
    from roe.study_lm_eval import _per_item

    metric, values, weights = _per_item([{"doc_id": 1, "metrics": ["acc"], "acc": 0.0},
                                         {"doc_id": 0, "metrics": ["acc"], "acc": 1.0}])
    assert (metric, values, weights) == ("acc", [1.0, 0.0], None)
    metric, values, weights = _per_item([{"doc_id": 0, "metrics": ["word_perplexity"], "word_perplexity": (-3.0, 2)}])
    assert (values, weights) == ([3.0], [2.0])


def test_lm_eval_task_end_to_end(tmp_path, monkeypatch):
    """A local lm-eval multiple-choice task through the `roe` lm-eval model: per-item accuracies, paired."""
    import lm_eval_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval_tasks.write_builtin_data(tmp_path, choice=2)
    lm_eval_tasks.write_task(tmp_path, "study_choice", "choice", lm_eval_tasks.CHOICE)
    out = tmp_path / "out"
    args = ["" if a == "ppl,code" else a for a in ARGS]  # no built-in task: only the lm-eval one
    assert main([*args, "--test-examples", "2", "--seeds", "1", "--lm-eval", "study_choice",
                 "--lm-eval-include", str(tmp_path), "-o", str(out)]) == 0
    r = json.loads((out / "study.json").read_text())
    c = r["tasks"]["study_choice"]["comparison"]
    assert c["metric"] == "acc" and c["n"] == 2 and c["higher_is_better"] is True
    assert r["tuning"]["study_choice"]["from"].startswith("the model's")
    assert all(v in (0.0, 1.0) for row in r["tasks"]["study_choice"]["rows"] for v in row["values"])


# ---- adaptive K against fixed K at matched cost ---------------------------------------------------------------
ADAPTIVE_ARGS = ["study", "--model", "builtin:s", "--tasks", "ppl", "--trials", "2", "--val-examples", "3",
                 "--test-examples", "3", "--seeds", "2", "-k", "4", "--ks", "2,4", "--bench-tokens", "2",
                 "--bench-repeats", "1", "--bootstrap-resamples", "200", "--no-progress"]


def test_adaptive_variants_against_fixed_k_at_matched_cost(tmp_path):
    # entropy > 0 holds at every position: the variant is fixed K = 4 itself (same values, same experts read);
    # a top-2 margin below 0 never holds: no decode step runs noisy rows, so it reads the base model's experts
    assert main([*ADAPTIVE_ARGS, "--adaptive", "entropy:0,margin:0,entropy:0.5", "-o", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "study.json").read_text())
    assert max(r["tuning"]["ppl"]["tau"]) > 0  # the tuned RoE is noisy, or every comparison would be trivial
    c = r["tasks"]["ppl"]["comparison"]
    fixed = {f["k"]: f for f in c["roe"]}
    variants = {v["variant"]: v for v in c["adaptive"]}
    assert list(variants) == ["entropy 0", "margin 0", "entropy 0.5"] and all(v["k"] == 4 for v in c["adaptive"])
    always = variants["entropy 0"]
    assert always["per_seed"] == pytest.approx(fixed[4]["per_seed"], abs=1e-9)
    assert always["cost"]["experts_per_layer_step"] == fixed[4]["cost"]["experts_per_layer_step"]
    assert always["matched_k"] == 4 and always["difference_vs_matched"]["mean"] == pytest.approx(0, abs=1e-9)
    never = variants["margin 0"]
    assert never["cost"]["experts_per_layer_step"] == c["base"]["cost"]["experts_per_layer_step"]
    assert never["matched_k"] == 2  # the cheapest fixed K is the nearest
    base_experts = c["base"]["cost"]["experts_per_layer_step"]
    assert base_experts < fixed[2]["cost"]["experts_per_layer_step"] < fixed[4]["cost"]["experts_per_layer_step"]
    some = variants["entropy 0.5"]
    assert base_experts <= some["cost"]["experts_per_layer_step"] <= fixed[4]["cost"]["experts_per_layer_step"]
    for v in c["adaptive"]:
        assert v["seeds"] == 2 and {"mean", "ci_low", "ci_high", "verdict"} <= set(v["difference_vs_matched"])
    md = (tmp_path / "study.md").read_text()
    assert "## Adaptive K vs fixed K at matched cost" in md and "| ppl | adaptive K = 4, margin 0 |" in md


@pytest.mark.parametrize("extra, message", [
    (["--adaptive", "entropy"], "METRIC:THRESHOLD"),
    (["--adaptive", "loss:1"], "METRIC:THRESHOLD"),
    (["--adaptive", "margin:2"], "margin"),
    (["--adaptive", "entropy:1,entropy:1"], "twice"),
    (["--adaptive", "entropy:1", "--adaptive-metric", "margin", "--adaptive-threshold", "0.5"], "fixed K"),
    (["--adaptive", "entropy:1", "--cache", "full"], "clean cache"),
])
def test_bad_adaptive_flags_are_one_line_errors(extra, message, capsys, tmp_path):
    assert main([*ADAPTIVE_ARGS, "-o", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
