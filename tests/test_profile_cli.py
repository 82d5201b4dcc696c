"""`conspo profile` end to end on the tiny smoke config: it writes the HLO, the traces and the summary,
and their contents say what ran; bad flags end with one line naming the flag and exit code 2."""

import contextlib
import io
import json
import os

import jax
import pytest

from conspo_jax import profiling as P
from conspo_jax.cli import main

ARITH = "experiments/arith_tiny.py:smoke"  # 8 prompts x 4 samples, prompts of 16 tokens, 8 new tokens
ROWS, WIDTH, MAX_NEW = 8 * 4, 16 + 8, 8
PROGRAMS = ("train", "prefill", "decode")


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("profile"))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["conspo", "profile", f"--config={ARITH}", f"--workdir={workdir}", "--steps=2"])
    assert code == 0
    with open(os.path.join(workdir, "summary.json")) as f:
        return workdir, json.load(f), stdout.getvalue()


def test_summary_rows_hold_the_measured_numbers(profiled):
    _, summary, _ = profiled
    rows = {r["name"].split()[0]: r for r in summary["rows"]}
    assert sorted(rows) == sorted(PROGRAMS)
    train, prefill, decode = rows["train"], rows["prefill"], rows["decode"]
    assert train["name"] == f"train {ROWS}x{WIDTH} remat=none"
    assert train["tokens_per_step"] == ROWS * WIDTH
    for r in rows.values():
        # The programs are SPMD over every device (8 host devices in tests): FLOPs are the whole mesh's.
        n = jax.device_count()
        assert r["devices"] == n and (n == 1 or f"x {n} devices" in r["peak_flops_how"])
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
        assert r["model_flops_per_token"] > 0 and r["executed_flops_per_token"] > 0
        assert r["compiled_peak_bytes"] > 0 and 0 < r["mfu"] < 1
        assert r["cudnn_attention"] is False  # CPU: no cuDNN
        assert r["program_num_f32_dots"] > 0  # float32 config: every matmul is f32
    # No remat: the update executes the model's forward + backward FLOPs, a little attention aside.
    assert 0.95 < train["executed_over_model"] < 1.15, train["executed_over_model"]
    assert 0.8 < prefill["executed_over_model"] < 1.2, prefill["executed_over_model"]
    # Decode: one chunk mid-generation, every row live; the donated cache is never copied.
    start = summary["programs"]["decode"]["start_count"]
    assert decode["tokens_per_step"] == ROWS * (MAX_NEW - start)
    assert decode["kv_cache_copies"] == 0 and prefill["kv_cache_copies"] == 0
    assert summary["peak_flops"] > 0 and "measured" in summary["peak_flops_how"]
    assert summary["model"]["remat"] == "none"
    # The test session's compilation cache is on (conftest), so the summary warns about cache hits.
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    assert summary["compilation_cache"] == cache and (not cache or cache in summary["table"])


def test_compile_reports_and_hlo_text(profiled):
    workdir, summary, _ = profiled
    for name in PROGRAMS:
        report = summary["programs"][name]["report"]
        assert report["flops"] > 0 and report["bytes_accessed"] > 0
        assert report["argument_bytes"] > 0 and report["temp_bytes"] >= 0
        assert report["peak_bytes"] == (
            report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"] - report["alias_bytes"]
        )
        hlo = open(os.path.join(workdir, f"{name}.hlo.txt")).read()
        stablehlo = open(os.path.join(workdir, f"{name}.stablehlo.txt")).read()
        assert hlo.startswith("HloModule") and "ENTRY" in hlo
        assert "func.func public @main" in stablehlo and "stablehlo.dot_general" in stablehlo
    # The update runs the optimizer: Adam's moments are arguments, donated back (aliased).
    assert summary["programs"]["train"]["report"]["alias_bytes"] > 0


def test_traces_have_one_annotated_step_per_call(profiled):
    _, summary, _ = profiled
    for name in PROGRAMS:
        files = summary["programs"][name]["trace"]
        assert os.sep + os.path.join(f"trace_{name}", "plugins", "profile") + os.sep in files["xplane"]
        xplane = open(files["xplane"], "rb").read()
        assert name.encode() in xplane  # the step annotation's name is in the XPlane's metadata
        assert os.path.getsize(files["memory_profile"]) > 0
        events = P.read_perfetto_events(files["perfetto"])
        steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name and e.get("ph") == "X")
        assert steps == [0, 1], (name, steps)
        assert len(summary["programs"][name]["step_seconds"]) == 2


def test_the_table_is_printed_last(profiled, capsys):
    _, summary, _ = profiled
    table = summary["table"].splitlines()
    assert table[0].split()[:3] == ["program", "step", "s"]
    assert [ln.split()[0] for ln in table[2:5]] == list(PROGRAMS)
    assert table[5].startswith("MFU peak: ")


def test_compile_only_analyses_the_same_programs_and_runs_nothing(profiled, tmp_path):
    """--compile_only builds the programs over abstract state: the lowered programs are the ones the full
    run profiled (so a GPU-sized run can be read on a CPU), and nothing is timed or traced."""
    full_dir, full, _ = profiled
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["conspo", "profile", f"--config={ARITH}", f"--workdir={tmp_path}", "--compile_only"])
    assert code == 0 and "trace_" not in stdout.getvalue()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compile_only"] is True and summary["peak_flops"] is None
    assert not any(name.startswith("trace_") for name in os.listdir(tmp_path))
    rows = {r["name"].split()[0]: r for r in summary["rows"]}
    assert sorted(rows) == sorted(PROGRAMS)
    full_rows = {r["name"].split()[0]: r for r in full["rows"]}
    for name, r in rows.items():
        assert r["step_s"] is None and r["mfu"] is None and r["compile_s"] > 0
        assert r["executed_flops_per_token"] == pytest.approx(full_rows[name]["executed_flops_per_token"])
        assert r["compiled_peak_bytes"] == full_rows[name]["compiled_peak_bytes"]
        with open(os.path.join(full_dir, f"{name}.stablehlo.txt")) as f:
            assert (tmp_path / f"{name}.stablehlo.txt").read_text() == f.read(), name


@pytest.mark.parametrize(
    "flag,needle",
    [
        ("--what=bogus", "--what"),
        ("--steps=0", "--steps"),
        ("--peak_tflops=-1", "--peak_tflops must be > 0, got -1.0"),
    ],
)
def test_bad_flags_are_one_line_exit_2(capsys, tmp_path, flag, needle):
    code = main(["conspo", "profile", f"--config={ARITH}", f"--workdir={tmp_path}", flag])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err, err
    assert not os.listdir(tmp_path)  # nothing was built


def test_workdir_is_required(capsys):
    assert main(["conspo", "profile", f"--config={ARITH}"]) == 2
    assert "--workdir is required for profile" in capsys.readouterr().err
