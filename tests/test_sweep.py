"""The sweep machinery: CI arithmetic against hand computations, the report's tables from fixed runs, and
the ``:quick`` study end to end (runs, skip, resume of an interrupted run, table and figure files)."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
from matplotlib import image as plt_image

from conspo_jax.base.configs import UsageError
from conspo_jax.sweep import Point, load_sweep, mean_ci, paired_difference, train_command, write_report
from conspo_jax.sweep.report import collect, curve_stats, ranks
from conspo_jax.sweep.runner import estimate_remaining, launch_order, run_state, worker_env
from tests.conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Student t quantiles t_{0.975, df} from a printed table (not from scipy, which the code uses).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


def test_mean_ci_matches_a_hand_computation():
    ci = mean_ci([0.30, 0.40, 0.35])
    # mean 0.35; s = sqrt((0.05^2 + 0.05^2 + 0) / 2) = 0.05; half = t(2) * 0.05 / sqrt(3)
    assert ci.mean == pytest.approx(0.35) and ci.n == 3
    assert ci.half_width == pytest.approx(T975[2] * 0.05 / math.sqrt(3), rel=1e-3)
    two = mean_ci([0.1, 0.3])  # s = 0.1414, half = 12.706 * 0.1414 / 1.414 = 1.2706
    assert two.half_width == pytest.approx(1.2706, rel=1e-3)
    assert (two.low, two.high) == pytest.approx((0.2 - 1.2706, 0.2 + 1.2706), rel=1e-3)
    one = mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.half_width) and one.as_dict()["ci95"] is None
    assert mean_ci([]).n == 0
    with pytest.raises(ValueError, match="finite"):
        mean_ci([0.1, float("nan")])


def test_paired_difference_uses_only_common_seeds():
    d = paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {0: 0.4, 1: 0.4, 2: 0.6, 3: 0.9})
    # diffs 0.1, 0.2, 0.1: mean 0.1333, s = 0.05774, half = 4.303 * 0.05774 / sqrt(3) = 0.1434
    assert d.n == 3 and d.mean == pytest.approx(0.4 / 3)
    assert d.half_width == pytest.approx(0.1434, rel=1e-3)


def test_score_standard_error_bounds():
    from conspo_jax.sweep.stats import score_standard_error

    assert score_standard_error(0.4, 256) == pytest.approx((0.030619, 0.030619), rel=1e-4)  # sqrt(.24/256)
    lo, hi = score_standard_error(0.4, 400, 4)
    assert (lo, hi) == pytest.approx((math.sqrt(0.24 / 1600), math.sqrt(0.24 / 400)))
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        score_standard_error(1.5, 10)


def test_ranks_bold_and_runner_up_share_ties():
    assert ranks([0.3, 0.5, 0.5, 0.1, float("nan")]) == [1, 0, 0, 2, 2]


def test_eta_counts_running_and_queued_work():
    assert estimate_remaining([], [1.0], 3, 2) is None
    # mean 10 s; running ones have 6 and 0 s left; 2 queued = 20 s; 26 s of work on 2 workers
    assert estimate_remaining([8.0, 12.0], [4.0, 11.0], 2, 2) == pytest.approx(13.0)


def test_grid_commands_seed_pairing_and_bad_input(tmp_path):
    p = Point(name="grpo_s3", method="grpo", seed=3, overrides={"objective.name": "grpo", "train.progress_bar": True})
    cmd = train_command(
        p, config_spec="e.py:smoke", run_dir="D/runs/grpo_s3", cache_root="D/warmstart", extra_overrides={"a.b": 1}
    )
    assert cmd[1:8] == ["-m", "conspo_jax", "train", "--config", "e.py:smoke", "--workdir", "D/runs/grpo_s3"]
    assert cmd[8:] == [
        "--config.a.b=1",
        "--config.objective.name=grpo",
        "--config.train.progress_bar=true",
        "--config.seed=3",
        "--config.sft.cache_dir=D/warmstart/seed_3",
    ]
    assert "--config.sft.cache_dir" not in " ".join(train_command(p, config_spec="e", run_dir="d", cache_root=None))
    with pytest.raises(UsageError, match="seed"):
        Point(name="x", method="m", seed=0, overrides={"seed": 1})
    with pytest.raises(UsageError, match="names a directory"):
        Point(name="a/b", method="m", seed=0)
    bad = tmp_path / "dup.py"
    bad.write_text(
        "from conspo_jax.sweep import Point\ndef get_sweep(arg=None):\n    return [Point('a', 'm', 0)] * 2\n"
    )
    with pytest.raises(UsageError, match="two points are named 'a'"):
        load_sweep(str(bad))
    with pytest.raises(UsageError, match="unknown sweep argument 'bogus'"):
        load_sweep(os.path.join(REPO, "experiments/sweeps/table1.py:bogus"))
    with pytest.raises(UsageError, match="no such sweep file"):
        load_sweep(str(tmp_path / "nope.py"))
    # The first point of every seed goes first (it computes that seed's warm start).
    pts = [Point(f"{m}_s{s}", m, s) for s in (0, 1) for m in ("a", "b")]
    assert [q.name for q in launch_order(pts)] == ["a_s0", "a_s1", "b_s0", "b_s1"]
    pinned = worker_env(2, {"XLA_FLAGS": "--x"}, single_thread=True)["XLA_FLAGS"]
    assert pinned == "--x --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    assert worker_env(2, {"XLA_FLAGS": "--x"}) == {"XLA_FLAGS": "--x"}  # default: measured faster
    assert worker_env(1, {}, single_thread=True) == {}


def test_sweep_modules_define_the_papers_grids():
    table1 = load_sweep(os.path.join(REPO, "experiments/sweeps/table1.py"))
    methods = list(dict.fromkeys(p.method for p in table1))
    assert len(methods) == 12 and len(table1) == 60  # + Base = Table 1's 9 rows and Table 6's 4 ablations
    assert {"grpo", "dapo", "dr_grpo", "disco", "gmpo", "cispo", "sapo", "conspo"} <= set(methods)
    params = load_sweep(os.path.join(REPO, "experiments/sweeps/params.py"))
    assert len(params) == 30  # 3 seeds x (1 defaults run + 3 x 3 off-default values)
    values = {k: sorted({p.params[k] for p in params if k in p.params}) for k in ("tau", "max_margin", "warmup_ratio")}
    assert values == {"tau": [1, 5, 10, 20], "max_margin": [0, 0.005, 0.01, 0.05], "warmup_ratio": [0.1, 0.3, 0.5, 1]}


def test_every_shipped_sweep_module_loads_and_the_lora_rows_pair_with_full():
    for name in sorted(os.listdir(os.path.join(REPO, "experiments/sweeps"))):
        if name.endswith(".py") and not name.startswith("_"):
            points = load_sweep(os.path.join(REPO, "experiments/sweeps", name))
            assert points and len({p.name for p in points}) == len(points), name
    lora = load_sweep(os.path.join(REPO, "experiments/sweeps/lora.py") + ":rank=4,lora_lr=1e-3,seeds=2")
    by = {p.name: p for p in lora}
    assert sorted(by) == ["full_s0", "full_s1", "lora_r4_s0", "lora_r4_s1"]
    assert by["full_s1"].method == "conspo" and "model.lora.rank" not in by["full_s1"].overrides
    assert by["lora_r4_s1"].overrides["model.lora.rank"] == 4 and by["lora_r4_s1"].overrides["optim.lr"] == 1e-3
    with pytest.raises(ValueError, match="rank=0"):
        load_sweep(os.path.join(REPO, "experiments/sweeps/lora.py") + ":rank=0")


def _fake_run(root, name, before, evals, rewards):
    d = root / "runs" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"eval/accuracy_before": before, "eval/accuracy_after": evals[-1][1]}))
    rows = [{"step": 0, "eval/accuracy": before}]
    rows += [
        {"step": s, "reward/mean": r, **({"eval/accuracy": dict(evals)[s]} if s in dict(evals) else {})}
        for s, r in rewards
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_tables_from_fixed_runs(tmp_path):
    finals = {"conspo": [0.50, 0.60, 0.55], "grpo": [0.40, 0.45, 0.50], "conspo_no_margin": [0.52, 0.58, 0.50]}
    points = []
    for m, accs in finals.items():
        for s, acc in enumerate(accs):
            points.append(Point(f"{m}_s{s}", m, s))
            # best = a mid-training eval 0.05 above the final one for GRPO only
            mid = acc + (0.05 if m == "grpo" else -0.01)
            _fake_run(tmp_path, f"{m}_s{s}", 0.2 + 0.01 * s, [(1, mid), (2, acc)], [(1, 0.3), (2, 0.4 + s / 10)])
    points.append(Point("cispo_s0", "cispo", 0))  # never ran: reported as missing
    res = write_report(points, str(tmp_path))
    t1 = {r["method"]: r for r in res["tables"]["table1"]}
    assert list(t1) == ["base", "conspo", "grpo"]
    assert t1["conspo"]["final"]["mean"] == pytest.approx(0.55)
    assert t1["conspo"]["final"]["ci95"] == pytest.approx(T975[2] * 0.05 / math.sqrt(3), rel=1e-3)
    assert t1["grpo"]["best"]["mean"] == pytest.approx(0.50)
    assert t1["base"]["final"]["mean"] == pytest.approx(0.21)
    # GRPO - ConSPO per seed: -0.10, -0.15, -0.05 -> mean -0.10, s = 0.05
    assert t1["grpo"]["diff_final"]["mean"] == pytest.approx(-0.10)
    assert t1["grpo"]["diff_final"]["ci95"] == pytest.approx(T975[2] * 0.05 / math.sqrt(3), rel=1e-3)
    assert t1["conspo"]["diff_final"] is None
    assert [r["method"] for r in res["tables"]["table6"]] == ["conspo", "conspo_no_margin"]
    assert res["missing"] == ["cispo_s0"]
    # The curves' paired column: GRPO - ConSPO per seed at every eval step (step 1: the final gap + 0.06).
    steps, mean, half = curve_stats(collect(points, str(tmp_path)), "grpo", "eval/accuracy", reference="conspo")
    assert steps.tolist() == [0, 1, 2] and mean == pytest.approx([0.0, -0.04, -0.10])
    assert half[2] == pytest.approx(T975[2] * 0.05 / math.sqrt(3), rel=1e-3)
    md = (tmp_path / "table.md").read_text()
    # Best in bold, runner-up underlined; GRPO's best is a mid-training eval, ConSPO's its final one.
    assert "| ConSPO | 3 | **55.0 ± 12.4** | **55.0 ± 12.4** |  |  |" in md
    assert "| GRPO | 3 | <u>45.0 ± 12.4</u> | <u>50.0 ± 12.4</u> | -10.0 ± 12.4 | -5.0 ± 12.4 |" in md
    assert "| Base | 3 | 21.0 ± 2.5 | 21.0 ± 2.5 | -34.0 ± 11.4 |" in md
    assert "| w/o scheduled margin | 3 | <u>53.3 ± 10.3</u> |" in md
    csv_rows = (tmp_path / "table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("table,method,seeds,final_mean,final_ci95") and len(csv_rows) == 1 + 3 + 2
    # Two rows of curves (Table 1's methods, then the ablations with ConSPO), each 4 in at 120 dpi.
    assert plt_image.imread(tmp_path / "curves.png").shape[:2] == (2 * 4 * 120, 16 * 120)
    assert not (tmp_path / "figure1.png").exists()  # no run wrote credit dumps


def test_report_parameter_study(tmp_path):
    points = []
    for s, (a, b) in enumerate([(0.5, 0.3), (0.6, 0.4)]):
        points.append(Point(f"defaults_s{s}", "conspo", s, params={"tau": 10.0, "max_margin": 0.01}))
        _fake_run(tmp_path, f"defaults_s{s}", 0.2, [(2, a)], [(1, 0.3), (2, 0.4)])
        points.append(Point(f"tau=1_s{s}", "conspo", s, params={"tau": 1.0}, in_table=False))
        _fake_run(tmp_path, f"tau=1_s{s}", 0.2, [(2, b)], [(1, 0.3), (2, 0.4)])
    res = write_report(points, str(tmp_path))
    tau = {e["value"]: e for e in res["figure2"]["tau"]}
    assert tau[1.0]["final"]["mean"] == pytest.approx(0.35) and tau[10.0]["final"]["mean"] == pytest.approx(0.55)
    assert tau[1.0]["final"]["ci95"] == pytest.approx(T975[1] * np.std([0.3, 0.4], ddof=1) / math.sqrt(2), rel=1e-3)
    assert [e["value"] for e in res["figure2"]["max_margin"]] == [0.01]
    # Paired by seed against the defaults run: 0.3 - 0.5 and 0.4 - 0.6, so -0.2 with no spread.
    assert tau[1.0]["diff_final"]["mean"] == pytest.approx(-0.2) and tau[1.0]["diff_final"]["ci95"] == pytest.approx(0)
    assert tau[10.0]["diff_final"]["mean"] == pytest.approx(0.0)
    md = (tmp_path / "table.md").read_text()
    assert "| tau | 1 | 2 | 35.0 ± 63.5 | 35.0 ± 63.5 | -20.0 ± 0.0 | -20.0 ± 0.0 |" in md
    assert "figure2,tau=1,2,0.35," in (tmp_path / "table.csv").read_text()
    assert [r["method"] for r in res["tables"]["table1"]] == ["base", "conspo"]  # tau=1 runs are not rows
    assert (tmp_path / "params.png").exists() and "| tau | 1 | 2 |" in (tmp_path / "table.md").read_text()


def test_the_sweep_package_does_not_import_the_trainer():
    import subprocess

    code = "import conspo_jax.sweep.cli, sys; print([m for m in sys.modules if m.startswith('conspo_jax.train')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_quick_sweep_runs_skips_and_resumes(tmp_path, monkeypatch, capsys):
    from conspo_jax.sweep.cli import main

    monkeypatch.chdir(REPO)
    # The children: one CPU device, fast compiles (the tests' conftest asks for 8 host devices).
    monkeypatch.setenv("XLA_FLAGS", xla_flags("--xla_backend_optimization_level=0"))
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = tmp_path / "study"
    argv = [
        "sweep",
        "--config",
        "experiments/arith_tiny.py:smoke",
        "--sweep",
        "experiments/sweeps/table1.py:quick",
        "--workdir",
        str(work),
        "--workers",
        "2",
    ]
    assert main(argv) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "4 launched, 0 skipped, 0 failed" in out and "4/4 done, 0 running, 0 left" in out
    runs = {n: work / "runs" / n for n in ("conspo_s0", "grpo_s0", "conspo_s1", "grpo_s1")}
    assert all(run_state(str(d)) == "done" for d in runs.values())
    cfg = json.loads((runs["grpo_s1"] / "config.json").read_text())
    assert (cfg["seed"], cfg["objective"]["name"], cfg["train"]["num_steps"]) == (1, "grpo", 4)
    # Paired seeds: both methods of one seed start from the same warm start.
    before = {n: json.loads((d / "results.json").read_text())["eval/accuracy_before"] for n, d in runs.items()}
    assert before["conspo_s0"] == before["grpo_s0"] and before["conspo_s1"] == before["grpo_s1"]

    # Interrupt one run after its step-2 checkpoint: what a kill then leaves (the trainer rewrites
    # results.json at every checkpoint; accuracy_after appears only at the end).
    victim = runs["grpo_s0"]
    shutil.rmtree(victim / "checkpoints" / "4")
    (victim / "results.json").write_text(json.dumps({"eval/accuracy_before": before["grpo_s0"]}))
    assert run_state(str(victim)) == "partial"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 finished already, 1 to run" in out and "resumed grpo_s0" in out and "1 launched, 3 skipped" in out
    assert "resumed from step 2" in (victim / "train.log").read_text()
    steps = [json.loads(x)["step"] for x in (victim / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    # Finished: a third invocation launches nothing; another study's warm starts can be named.
    assert main([*argv, "--warmstart_dir", str(tmp_path / "shared_ws")]) == 0
    assert "0 launched, 4 skipped" in capsys.readouterr().out
    commands = [p["command"] for p in json.loads((work / "sweep.json").read_text())["points"]]
    for c in commands:
        seed = next(a.split("=")[1] for a in c if a.startswith("--config.seed="))
        assert f"--config.sft.cache_dir={tmp_path / 'shared_ws'}/seed_{seed}" in c

    res = json.loads((work / "results.json").read_text())
    t1 = {r["method"]: r for r in res["tables"]["table1"]}
    assert list(t1) == ["base", "conspo", "grpo"] and t1["conspo"]["n"] == 2
    finals = [json.loads((runs[f"conspo_s{s}"] / "results.json").read_text())["eval/accuracy_after"] for s in (0, 1)]
    assert t1["conspo"]["final"]["mean"] == pytest.approx(np.mean(finals))
    assert t1["conspo"]["final"]["ci95"] == pytest.approx(T975[1] * np.std(finals, ddof=1) / math.sqrt(2), rel=1e-3)
    for name in ("table.md", "table.csv", "results.json", "curves.png", "sweep.json"):
        assert (work / name).stat().st_size > 0, name
    # Figure 1 (left) from the GRPO and ConSPO runs' credit dumps (train.diagnostics_every=2 in :quick).
    for d in runs.values():
        assert sorted(os.listdir(d / "diagnostics")) == ["step_2.npz", "step_4.npz"]
    assert (work / "figure1.png").stat().st_size > 10_000 and "![Figure 1](figure1.png)" in (
        work / "table.md"
    ).read_text()
    assert "**Table 1 in miniature**" in (work / "table.md").read_text()


def test_figure1_pools_each_methods_own_credit_from_the_dumps(tmp_path):
    from conspo_jax.sweep.credit import plot_credit_figure, pooled_credit

    def dump(run, step, valid, gap, grpo, conspo, pos):
        d = tmp_path / run / "diagnostics"
        d.mkdir(parents=True, exist_ok=True)
        np.savez(
            d / f"step_{step}.npz",
            valid_R=np.array(valid),
            gap_R=np.array(gap, np.float32),
            credit_grpo_R=np.array(grpo, np.float32),
            credit_conspo_R=np.array(conspo, np.float32),
            is_pos_R=np.array(pos),
        )

    dump("g", 10, [True, True, False], [0.5, -0.5, np.nan], [0.25, -0.25, 0], [0.1, -0.1, 0], [True, False, False])
    dump("g", 2, [True, False, True], [0.2, np.nan, -0.2], [0.2, 0, -0.2], [0.3, 0, -0.3], [True, False, False])
    p = pooled_credit([str(tmp_path / "g")], "grpo")
    # Step order (2 before 10), only valid rollouts, the GRPO column.
    np.testing.assert_allclose(p["gap"], [0.2, -0.2, 0.5, -0.5])
    np.testing.assert_allclose(p["credit"], [0.2, -0.2, 0.25, -0.25])
    assert p["is_pos"].tolist() == [True, False, True, False]
    np.testing.assert_allclose(pooled_credit([str(tmp_path / "g")], "conspo")["credit"], [0.3, -0.3, 0.1, -0.1])
    assert not plot_credit_figure({"grpo": [str(tmp_path / "none")]}, str(tmp_path / "f.png"))
    assert not (tmp_path / "f.png").exists()
    assert plot_credit_figure({"grpo": [str(tmp_path / "g")], "conspo": [str(tmp_path / "g")]}, str(tmp_path / "f.png"))
    assert (tmp_path / "f.png").stat().st_size > 10_000
