"""Power and sample size: the model-side formulas against statsmodels, the human-side simulation against
normal-theory power where that is exact enough, and the command."""
import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.power import normal_power

from analysis.power import TrialModel, detectable_slope, provable_margin, simulate_designs, smallest_designs


def test_detectable_slope_has_the_target_power_by_statsmodels():
    se = 0.013
    mde = detectable_slope(se, alpha=0.05, power=0.8)
    assert normal_power(mde / se, nobs=1, alpha=0.05) == pytest.approx(0.8, abs=1e-3)


def test_detectable_slope_with_degrees_of_freedom_has_the_target_power_of_a_t_test():
    """With t on 24 df (a slope clustered by 25 models) the detectable slope is larger than the normal one,
    and a two-sided t-test at that true slope (non-central t) rejects with about the target power."""
    se, df = 0.013, 24
    mde = detectable_slope(se, alpha=0.05, power=0.8, df=df)
    assert mde > detectable_slope(se, alpha=0.05, power=0.8)
    crit = stats.t.ppf(0.975, df)
    power = stats.nct.sf(crit, df, mde / se) + stats.nct.cdf(-crit, df, mde / se)
    assert power == pytest.approx(0.8, abs=0.01)


def test_provable_margin_gives_tost_its_power_when_the_truth_is_zero():
    """TOST with a true effect of 0 rejects both one-sided nulls with P = 2Φ(m/se − z₁₋α) − 1."""
    se = 0.02
    m = provable_margin(se, alpha=0.05, power=0.8)
    assert 2 * stats.norm.cdf(m / se - stats.norm.ppf(0.95)) - 1 == pytest.approx(0.8, abs=1e-6)
    draws = np.random.default_rng(0).normal(0, se, 200_000)
    z = stats.norm.ppf(0.95)
    assert np.mean((draws - z * se > -m) & (draws + z * se < m)) == pytest.approx(0.8, abs=0.005)


@pytest.mark.parametrize("df", [2, 3, 9])
def test_with_few_degrees_of_freedom_both_have_their_power_in_simulated_studies(df):
    """A slope from a handful of models (t with 2–9 df): simulated estimates with an estimated standard
    error (SE-hat² ~ SE²·χ²_df/df) reject at the detectable slope, and pass TOST at the provable margin
    when the truth is 0, 80 % of the time; the normal-approximation formula falls short at 2 df."""
    se, n = 0.01, 400_000
    rng = np.random.default_rng(df)
    se_hat = se * np.sqrt(rng.chisquare(df, n) / df)
    noise = rng.normal(0, se, n)
    mde = detectable_slope(se, alpha=0.05, power=0.8, df=df)
    two_sided = stats.t.ppf(0.975, df)
    assert np.mean(np.abs((mde + noise) / se_hat) > two_sided) == pytest.approx(0.8, abs=0.004)
    margin = provable_margin(se, alpha=0.05, power=0.8, df=df)
    one_sided = stats.t.ppf(0.95, df)
    assert np.mean((noise - one_sided * se_hat > -margin) & (noise + one_sided * se_hat < margin)) == \
        pytest.approx(0.8, abs=0.004)
    if df == 2:
        approx = (two_sided + stats.t.ppf(0.8, df)) * se
        assert np.mean(np.abs((approx + noise) / se_hat) > two_sided) < 0.78


def test_the_slope_for_a_change_reaches_that_change_in_averaged_accuracy():
    model = TrialModel("natural", intercept=1.2, participant_sd=0.6, unit_sd=0.9, rates=(0.0, 0.5, 1.0), source="")
    beta = model.slope_for_change(-0.1)
    rng = np.random.default_rng(1)
    effects = rng.normal(0, math.hypot(0.6, 0.9), 400_000)
    start = np.mean(1 / (1 + np.exp(-(1.2 + effects))))
    end = np.mean(1 / (1 + np.exp(-(1.2 + beta + effects))))
    assert end - start == pytest.approx(-0.1, abs=0.002)
    with pytest.raises(ValueError, match="leaves"):
        model.slope_for_change(-0.9)


@pytest.mark.parametrize("rates", [(0.0, 0.75), (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)])
def test_simulated_power_matches_theory_without_random_effects(rates):
    """σ_p = σ_u = σ_m = 0: participant accuracies are binomial.  With two models the simulated studies are
    analysed per participant (normal theory from the binomial variance); with six, on the model means (non-
    central t with models − 2 df, each mean's variance the binomial one over its participants)."""
    model = TrialModel("natural", intercept=0.8, participant_sd=0.0, unit_sd=0.0, rates=rates, source="")
    n, t, change = 84, 20, -0.08
    table = simulate_designs(model, changes=[change], participants=[n], trials=[t], margin=0.05,
                             simulations=3000, seed=2)
    beta = model.slope_for_change(change)
    x = np.asarray(rates) if len(rates) >= 3 else np.asarray(rates)[np.arange(n) % len(rates)]
    p = 1 / (1 + np.exp(-(0.8 + beta * x)))
    sxx = np.sum((x - x.mean()) ** 2)
    slope = np.polyfit(x, p, 1)[0]
    per_point = t * (n // len(rates)) if len(rates) >= 3 else t
    se = math.sqrt(np.mean(p * (1 - p) / per_point) / sxx)
    if len(rates) >= 3:
        df = len(rates) - 2
        crit = stats.t.ppf(0.975, df)
        expected = stats.nct.sf(crit, df, abs(slope) / se) + stats.nct.cdf(-crit, df, abs(slope) / se)
    else:
        expected = stats.norm.cdf(abs(slope) / se - stats.norm.ppf(0.975))
    assert table["power_detect"].iloc[0] == pytest.approx(expected, abs=0.04)


def test_power_grows_with_participants_and_equivalence_needs_many():
    model = TrialModel("synthetic", intercept=1.0, participant_sd=0.5, unit_sd=0.8, rates=tuple(np.arange(9) / 10),
                       source="")
    table = simulate_designs(model, changes=[0.0, -0.1], participants=[12, 48, 400], trials=[20], margin=0.05,
                             simulations=600, seed=3)
    detect = table[table.change_over_span == -0.1].sort_values("participants")["power_detect"].tolist()
    assert detect[0] < detect[1] < detect[2] and detect[2] > 0.95
    equivalent = table[table.change_over_span == 0].sort_values("participants")["power_equivalence"].tolist()
    assert equivalent[0] < 0.2 and equivalent[2] > equivalent[0]
    smallest = {(row["change_over_span"], row["goal"]): row["participants"] for row in smallest_designs(table)}
    assert smallest[(-0.1, "detect")] in (48, 400)
    assert table["power_detect"].isna().tolist() == (table.change_over_span == 0).tolist()


def test_the_trial_model_comes_from_human_responses_once_there_are_enough():
    """Simulated people with a known participant spread (logit SD 0.6, no unit spread): the moment
    estimates recover it, and the source says the humans were used."""
    import pandas as pd

    from analysis.power import fit_trial_model

    rng = np.random.default_rng(4)
    rows = []
    for person in range(200):
        rate = (0.0, 0.5)[person % 2]
        ability = rng.normal(0, 0.6)
        for trial in range(60):
            p = 1 / (1 + np.exp(-(1.0 + ability - 0.5 * rate)))
            rows.append({"participant": f"p{person}", "kind": "natural", "rate": rate, "unit_id": f"u{trial % 30}",
                         "correct": bool(rng.random() < p)})
    trials = pd.DataFrame(rows)
    units = pd.DataFrame({"kind": ["natural"], "rate": [0.0], "status": ["ok"], "mis": [0.7]})
    model = fit_trial_model("natural", units, trials, (0.0, 0.5), assumed_participant_sd=5.0)
    assert "human participants" in model.source
    assert model.participant_sd == pytest.approx(0.6, abs=0.15) and model.unit_sd < 0.25
    expected = np.mean([1 / (1 + np.exp(-(1.0 + a))) for a in rng.normal(0, 0.6, 100_000)])
    assert model.mean_accuracy(0.0, 0.0) == pytest.approx(expected, abs=0.03)
    assert model.intercept == pytest.approx(1.0, abs=0.15)


def test_the_logit_scale_matches_the_averaged_accuracy_and_each_spread_by_brute_force():
    """β₀ and SDs from :func:`logit_scale`, simulated by brute force (a million draws of three independent
    intercepts): the averaged accuracy and the variance of each component's conditional mean accuracy come
    back as asked, far from 0.5 too, where the delta method at p̄(1 − p̄) misses both."""
    from analysis.power import logit_scale

    rng = np.random.default_rng(11)
    for accuracy, variances in [(0.85, (0.012, 0.02, 0.004)), (0.6, (0.01, 0.0, 0.02))]:
        intercept, sds = logit_scale(accuracy, variances)
        draws = rng.normal(0.0, 1.0, (3, 400_000)) * np.asarray(sds)[:, None]
        assert np.mean(1 / (1 + np.exp(-(intercept + draws.sum(axis=0))))) == pytest.approx(accuracy, abs=0.002)
        for k, wanted in enumerate(variances):
            levels = np.linspace(-3, 3, 61) * sds[k]                   # E[P | b_k] on a grid, Monte Carlo inside
            rest = np.delete(draws, k, axis=0).sum(axis=0)[:20_000]
            means = np.array([np.mean(1 / (1 + np.exp(-(intercept + level + rest)))) for level in levels])
            weights = stats.norm.pdf(np.linspace(-3, 3, 61))
            centre = np.sum(weights * means) / weights.sum()
            assert np.sum(weights * (means - centre) ** 2) / weights.sum() == pytest.approx(wanted, abs=6e-4)
        delta = [math.sqrt(v) / (accuracy * (1 - accuracy)) for v in variances]
        if accuracy == 0.85:
            assert all(sd > d * 1.05 for sd, d in zip(sds, delta) if d > 0)
            assert 1 / (1 + np.exp(-intercept)) > accuracy + 0.02


def test_human_spreads_far_from_chance_come_back_on_the_logit_scale():
    """People nested in 16 models at an accuracy near 0.82 (β₀ 2, σ_p 0.8, σ_u 1, σ_m 0.5): over 12 simulated
    surveys the trial model reproduces each survey's accuracy and recovers the spreads, where converting at
    p̄(1 − p̄) read every SD low and the accuracy 0.04 short."""
    import pandas as pd

    from analysis.power import fit_trial_model

    rng = np.random.default_rng(2)
    found = []
    for _ in range(12):
        models, people, units, trials = 16, 640, 60, 40
        shared, unit = rng.normal(0, 0.5, models), rng.normal(0, 1.0, units)
        model = np.arange(people) % models
        shown = rng.integers(0, units, (people, trials))
        eta = 2.0 + shared[model][:, None] + rng.normal(0, 0.8, people)[:, None] + unit[shown]
        correct = rng.random((people, trials)) < 1 / (1 + np.exp(-eta))
        survey = pd.DataFrame({"participant": np.repeat(np.arange(people), trials), "kind": "natural",
                               "rate": np.repeat(model / 20, trials), "model_id": np.repeat(model, trials),
                               "unit_id": shown.ravel(), "correct": correct.ravel()})
        fitted = fit_trial_model("natural", pd.DataFrame(), survey, sorted(np.arange(models) / 20), 5.0)
        found.append((fitted.mean_accuracy(0.0, 0.0) - correct.mean(), fitted.participant_sd, fitted.unit_sd,
                      fitted.model_sd))
    gap, participant_sd, unit_sd, model_sd = np.mean(found, axis=0)
    assert abs(gap) < 0.01
    assert participant_sd == pytest.approx(0.8, abs=0.1) and unit_sd == pytest.approx(1.0, abs=0.12)
    assert model_sd == pytest.approx(0.5, abs=0.1)


def test_a_real_effect_of_rate_is_not_read_as_spread():
    """The same people, units and models as above with a slope of −3 per unit rate (accuracy 0.85 at rate 0,
    0.4 at 0.75): the spreads come back as without it, where reading them about the mean of all rates and
    converting at the rate-0 accuracy made σ_p and σ_u about twice too large; without model names σ_p
    carries σ_m too (√(0.8² + 0.5²) = 0.94)."""
    import pandas as pd

    from analysis.power import fit_trial_model

    rng = np.random.default_rng(4)
    found, merged = [], []
    for _ in range(8):
        models, people, units, trials = 16, 640, 60, 40
        shared, unit = rng.normal(0, 0.5, models), rng.normal(0, 1.0, units)
        model = np.arange(people) % models
        shown = rng.integers(0, units, (people, trials))
        eta = 2.0 - 3.0 * (model / 20)[:, None] + shared[model][:, None] + rng.normal(0, 0.8, people)[:, None] \
            + unit[shown]
        correct = rng.random((people, trials)) < 1 / (1 + np.exp(-eta))
        survey = pd.DataFrame({"participant": np.repeat(np.arange(people), trials), "kind": "natural",
                               "rate": np.repeat(model / 20, trials), "model_id": np.repeat(model, trials),
                               "unit_id": shown.ravel(), "correct": correct.ravel()})
        fitted = fit_trial_model("natural", pd.DataFrame(), survey, sorted(np.arange(models) / 20), 5.0)
        found.append((fitted.participant_sd, fitted.unit_sd, fitted.model_sd))
        unnamed = fit_trial_model("natural", pd.DataFrame(), survey.drop(columns="model_id"), [0.0, 0.75], 5.0)
        merged.append(unnamed.participant_sd)
    participant_sd, unit_sd, model_sd = np.mean(found, axis=0)
    assert participant_sd == pytest.approx(0.8, abs=0.12) and unit_sd == pytest.approx(1.0, abs=0.15)
    assert model_sd == pytest.approx(0.5, abs=0.12)
    assert np.mean(merged) == pytest.approx(math.hypot(0.8, 0.5), abs=0.12)


@pytest.mark.parametrize("participants, trials, message", [([20, 2], [12], "at least 3 participants, got 2"),
                                                            ([20], [12, 0], "at least 1 main trial, got 0"),
                                                            ([20], [-4], "at least 1 main trial, got -4")])
def test_a_design_without_participants_or_trials_is_refused_before_any_simulation(participants, trials, message):
    model = TrialModel("natural", intercept=1.0, participant_sd=0.5, unit_sd=0.8, rates=(0.0, 0.5), source="")
    with pytest.raises(ValueError, match=message):
        simulate_designs(model, changes=[0.0], participants=participants, trials=trials, margin=0.05, simulations=10)


def test_a_model_spread_is_analysed_on_model_means_and_keeps_a_null_at_its_nominal_rate():
    """σ_m = 0.6 (logit), 10 models, a change of −1e-6 (a null in effect): the simulation's model-mean test
    rejects about 5 % of the time.  Participant accuracies from the same generator regressed as if
    participants were independent (the test that ignores σ_m) reject several times as often."""
    from analysis.power import _accuracies, _ols_slopes

    rates = tuple(np.linspace(0.0, 0.9, 10))
    model = TrialModel("natural", intercept=1.0, participant_sd=0.5, unit_sd=0.5, rates=rates, source="",
                       model_sd=0.6)
    table = simulate_designs(model, changes=[-1e-6], participants=[200], trials=[12], margin=0.05,
                             simulations=2000, seed=5)
    assert table["power_detect"].iloc[0] == pytest.approx(0.05, abs=0.02)
    which = np.arange(200) % 10
    acc = _accuracies(model, 0.0, which, 12, 2000, np.random.default_rng(6))
    slope, se = _ols_slopes(np.asarray(rates)[which], acc)
    naive = np.mean(np.abs(slope / se) > stats.t.ppf(0.975, 198))
    assert naive > 0.3


def test_no_number_of_participants_removes_the_spread_models_share():
    """With σ_m = 0.5 over 6 models the power to detect −0.1 levels off below 80 % however many people
    take part, while with σ_m = 0 it passes 95 %; and the averaged accuracy folds σ_m in."""
    rates = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
    spread = TrialModel("natural", intercept=1.0, participant_sd=0.5, unit_sd=0.5, rates=rates, source="",
                        model_sd=0.5)
    table = simulate_designs(spread, changes=[-0.1], participants=[300, 3000], trials=[20], margin=0.05,
                             simulations=600, seed=7)
    few, many = table.sort_values("participants")["power_detect"].tolist()
    assert many < 0.8 and abs(many - few) < 0.1
    flat = TrialModel("natural", intercept=1.0, participant_sd=0.5, unit_sd=0.5, rates=rates, source="")
    assert simulate_designs(flat, changes=[-0.1], participants=[3000], trials=[20], margin=0.05,
                            simulations=300, seed=7)["power_detect"].iloc[0] > 0.95
    effects = np.random.default_rng(8).normal(0, math.sqrt(0.5 ** 2 * 3), 400_000)
    assert spread.mean_accuracy(0.0, 0.0) == pytest.approx(np.mean(1 / (1 + np.exp(-(1.0 + effects)))), abs=0.002)


def test_the_model_spread_comes_from_human_models_once_they_have_enough_people():
    """Simulated people nested in 16 models with known spreads (model 0.5, participant 0.4, logit): the
    moment estimates recover both; without model names, or with one person per model, σ_m is 0 and the
    source says why; from the MIS alone σ_m is the models' shared MIS SD on the logit scale."""
    import pandas as pd

    from analysis.power import fit_trial_model

    rng = np.random.default_rng(9)
    estimates = []
    for _ in range(30):
        rows = []
        shared = rng.normal(0, 0.5, 16)
        for person in range(320):
            model = person % 16
            ability = rng.normal(0, 0.4)
            p = 1 / (1 + np.exp(-(0.5 + shared[model] + ability)))
            rows += [{"participant": f"p{person}", "kind": "natural", "rate": model / 20, "model_id": f"m{model}",
                      "unit_id": f"u{trial}", "correct": bool(rng.random() < p)} for trial in range(40)]
        trials = pd.DataFrame(rows)
        fitted = fit_trial_model("natural", pd.DataFrame(), trials, sorted(np.arange(16) / 20), 5.0)
        estimates.append((fitted.model_sd, fitted.participant_sd))
    assert "σ_m from the model means" in fitted.source
    model_sd, participant_sd = np.mean(estimates, axis=0)
    assert model_sd == pytest.approx(0.5, abs=0.1) and participant_sd == pytest.approx(0.4, abs=0.1)
    unnamed = fit_trial_model("natural", pd.DataFrame(), trials.drop(columns="model_id"), [0.0, 0.5], 5.0)
    assert unnamed.model_sd == 0 and "name no model" in unnamed.source
    alone = trials[trials["participant"].isin([f"p{i}" for i in range(16)])]
    single = fit_trial_model("natural", pd.DataFrame(), alone, [0.0, 0.5], 5.0)
    assert single.model_sd == 0 and "two participants on one of them" in single.source
    # from the MIS: a model whose unit logits all move by 0.1 moves their mean MIS by `shift`; that shift
    # read back through the conversion is a logit SD of about 0.1 (at the mean MIS, p̄(1 − p̄), it reads 0.082)
    mis = np.array([0.55, 0.7, 0.85, 0.95, 0.97])
    shift = float(np.mean(1 / (1 + np.exp(-(np.log(mis / (1 - mis)) + 0.1)))) - mis.mean())
    units = pd.DataFrame({"kind": ["natural"] * 5, "rate": [0.0] * 5, "status": ["ok"] * 5, "mis": mis})
    from_mis = fit_trial_model("natural", units, trials.iloc[:0], [0.0, 0.5], 0.5, mis_model_sd=shift)
    assert from_mis.model_sd == pytest.approx(0.1, rel=0.05) and "shared MIS deviation" in from_mis.source
    # one person per model: the people cannot separate σ_m, so the MIS's comes on top of their σ_p
    single = fit_trial_model("natural", units, alone, [0.0, 0.5], 5.0, mis_model_sd=shift)
    assert single.model_sd == pytest.approx(from_mis.model_sd) and "shared MIS deviation instead" in single.source
    people = alone.groupby("participant").agg(rate=("rate", "first"), accuracy=("correct", "mean"))
    line = np.polyval(np.polyfit(people["rate"], people["accuracy"], 1), people["rate"].min())
    assert single.mean_accuracy(0.0, 0.0) == pytest.approx(line, abs=1e-6)     # the added σ_m keeps the accuracy
    assert fit_trial_model("natural", units, trials, [0.0, 0.5], 5.0, mis_model_sd=shift).model_sd == \
        pytest.approx(fitted.model_sd)


def test_the_fewest_participants_read_as_whole_numbers_or_more_than_the_largest_tried():
    """A design count is a whole number; where none tried reached the power the table says "> N" rather than
    leaving a blank (a missing value turns the column to floats: "320.000")."""
    from analysis.power import smallest_display

    shown = smallest_display([{"kind": "natural", "change_over_span": -0.1, "trials": 12, "goal": "detect",
                               "participants": 320, "largest_tried": 640},
                              {"kind": "natural", "change_over_span": 0.0, "trials": 12, "goal": "equivalence",
                               "participants": None, "largest_tried": 640}])
    assert shown["participants"].tolist() == ["320", "> 640"] and "largest_tried" not in shown
    assert smallest_display([]).empty


def test_participants_fill_the_models_one_rate_at_a_time():
    """Fewer participants than models still span the rates: with four models at rate 0 and one each at 0.3,
    0.6 and 0.9, three participants land on three different rates (in rate order they would all sit at 0
    and leave no slope to test)."""
    from analysis.power import _interleaved

    rates = np.array([0.0, 0.0, 0.0, 0.0, 0.3, 0.6, 0.9])
    order = _interleaved(rates)
    assert sorted(order.tolist()) == list(range(7))
    assert rates[order[:4]].tolist() == [0.0, 0.3, 0.6, 0.9]
    model = TrialModel("natural", intercept=1.0, participant_sd=0.5, unit_sd=0.5, rates=tuple(rates), source="")
    table = simulate_designs(model, changes=[-0.1], participants=[3, 7], trials=[12], margin=0.05, simulations=50)
    assert table["power_detect"].notna().all()


def test_without_enough_humans_the_trial_model_takes_the_base_model_alone_not_the_retrained_control():
    """The control also has rate 0; its units must not be counted as the base model's a second time."""
    import pandas as pd

    from analysis.power import _logit, fit_trial_model

    rng = np.random.default_rng(7)
    base_mis, control_mis = rng.uniform(0.6, 0.95, 40), rng.uniform(0.55, 0.7, 40)
    units = pd.DataFrame({"model_id": ["base"] * 40 + ["control-oneshot-r0.00"] * 40,
                          "method": ["base"] * 40 + ["control"] * 40, "kind": "natural", "rate": 0.0,
                          "status": "ok", "mis": np.concatenate([base_mis, control_mis])})
    model = fit_trial_model("natural", units, pd.DataFrame(), (0.0, 0.5), assumed_participant_sd=0.5)
    assert model.intercept == pytest.approx(float(np.mean(_logit(base_mis))))
    assert model.unit_sd == pytest.approx(float(np.std(_logit(base_mis), ddof=1)))
    assert "base model's 40 unit MIS" in model.source


def test_without_people_the_trial_model_says_it_takes_mis_for_accuracy_and_how_many_units_it_clipped():
    """An MIS of 1 has no finite logit: such units enter at 0.98 (β₀ and σ_u are those of the clipped logits,
    computed here), and the source counts them."""
    import pandas as pd

    from analysis.power import fit_trial_model

    mis = np.array([0.6, 0.7, 0.8, 0.9, 0.99, 1.0, 0.01])
    units = pd.DataFrame({"kind": "natural", "rate": 0.0, "status": "ok", "method": "base", "mis": mis})
    model = fit_trial_model("natural", units, pd.DataFrame(), (0.0, 0.5), assumed_participant_sd=0.5)
    logits = np.log(np.clip(mis, 0.02, 0.98) / (1 - np.clip(mis, 0.02, 0.98)))
    assert model.intercept == pytest.approx(logits.mean()) and model.unit_sd == pytest.approx(logits.std(ddof=1))
    assert "7 unit MIS standing in for people's accuracy" in model.source
    assert "3 of them outside [0.02, 0.98] taken at its edge" in model.source
    inside = fit_trial_model("natural", units[units["mis"].between(0.5, 0.95)], pd.DataFrame(), (0.0, 0.5), 0.5)
    assert "outside" not in inside.source
