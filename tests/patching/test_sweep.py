"""``mechkit sweep``: config errors name their path before any model loads; a sweep killed with
SIGKILL and started again ends with the uninterrupted run's table, no cell computed twice; its
scores equal :func:`mk.activation_patch` over all the prompt pairs at once.

The subprocess and most runs use the toy model, whose pairs come from a token-id JSONL file
built here; one test runs the shipped example config (IOI prompts) on smollm2-135m.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformer_lens import HookedTransformer

import mechkit as mk
from mechkit.__main__ import main
from mechkit.patching import sweep
from mechkit.patching.sweep import SweepEntry, build_pairs, load_config, run_sweep

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def _token_pairs(n: int = 5, length: int = 5, seed: int = 3) -> list[dict]:
    """Induction prompts for the toy: BOS, a segment, the segment again less its last token."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        draw = (torch.randperm(499, generator=generator)[: length + 1] + 1).tolist()
        segment, wrong = draw[:length], draw[length]
        rows.append(
            {
                "clean": [0, *segment, *segment[:-1]],
                "corrupt": [0, *segment[:-1], wrong, *segment[:-1]],
                "answer": segment[-1],
                "wrong": wrong,
            }
        )
    return rows


def _write_config(folder: Path, name: str = "sweep.yaml", **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pairs = folder / "pairs.jsonl"
    if not pairs.exists():
        pairs.write_text("".join(json.dumps(r) + "\n" for r in _token_pairs()))
    config = {
        "model": "attn-only-2l",
        "prompts": {"tokens": "pairs.jsonl"},
        "metric": "logit_diff",
        "sweeps": [{"site": "resid_pre"}, {"site": "z", "positions": "each"}],
        "batch_size": 2,
        "device": "cpu",
    }
    config.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _pairs_from_file(path: Path) -> mk.PromptPairs:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return mk.PromptPairs.from_tokens(
        [r["clean"] for r in rows],
        [r["corrupt"] for r in rows],
        [r["answer"] for r in rows],
        [r["wrong"] for r in rows],
    )


def _journal_cells(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [(r["entry"], r["batch"], tuple(r["cell"])) for r in records if r["kind"] == "cell"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(sweep, "load_model", refuse)


# ----------------------------------------------------------------------------------- config


BAD_VALUES = [
    (
        {"sweeps": [{"site": "resid_pre"}, {"site": "z", "positions": "evry"}]},
        "sweep.yaml: sweeps[1].positions: expected 'each', 'all' or a list of integers; got 'evry'",
    ),
    ({"metric": "logit_dif"}, "sweep.yaml: metric: expected 'logit_diff'"),
    ({"metric": "logit_dif"}, "Did you mean 'logit_diff'?"),
    ({"sweeps": [{"site": "resid_pree"}]}, "sweeps[0].site: expected 'resid_pre', "),
    ({"sweeps": [{"site": "resid_pre", "heads": [0]}]}, "sweeps[0].heads: applies to the head"),
    (
        {"sweeps": [{"site": "z", "layers": [0, "one"]}]},
        "sweeps[0].layers: expected null (all layers) or a list",
    ),
    ({"sweeps": []}, "sweep.yaml: sweeps: expected a non-empty list"),
    ({"batch_size": 0}, "sweep.yaml: batch_size: expected a positive integer or null; got 0"),
    ({"memory_budget": "lots"}, "sweep.yaml: memory_budget: expected a memory budget"),
    ({"direction": "denoising", "ablation": "zero"}, "ablation: expected corrupt or null with"),
    (
        {"ablation": "mena"},
        "ablation: expected 'corrupt', 'zero', 'mean', 'resample' or null; got 'mena'",
    ),
    ({"format": "csv"}, "sweep.yaml: format: expected 'jsonl' or 'parquet'; got 'csv'"),
    ({"prompts": {"tokens": "missing.jsonl"}}, "prompts.tokens: expected an existing JSONL file"),
    ({"prompts": {"tokens": "pairs.jsonl", "generator": "ioi"}}, "prompts: expected exactly one"),
    ({"prompts": {"generator": "ioi", "length": 4}}, "prompts.length: applies only to generator"),
    (
        {"sweeps": [{"site": "z", "name": "a"}, {"site": "v", "name": "a"}]},
        "sweeps[1].name: expected a name of its own",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_VALUES)
def test_bad_value_is_reported_with_its_path_before_any_model_loads(
    tmp_path, monkeypatch, capsys, no_model_load, overrides, expected
):
    monkeypatch.chdir(tmp_path)
    _write_config(tmp_path, **overrides)
    assert main(["sweep", "sweep.yaml", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechkit: error: sweep.yaml: ") and expected in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"sweeps": [{"site": "z", "layers": [0, 5]}]},
            "sweeps[0].layers: expected values in [0, 2)",
        ),
        ({"sweeps": [{"site": "v", "heads": [4]}]}, "sweeps[0].heads: expected values in [0, 4)"),
        ({"sweeps": [{"site": "mlp_out"}]}, "sweep.yaml: sweeps[0].site: "),
        ({"prompts": {"generator": "ioi"}}, "sweep.yaml: prompts.generator: expected a model with"),
    ],
)
def test_keys_checked_on_the_model_name_their_path(
    tmp_path, monkeypatch, capsys, overrides, expected
):
    monkeypatch.chdir(tmp_path)
    _write_config(tmp_path, **overrides)
    assert main(["sweep", "sweep.yaml", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mechkit: error: sweep.yaml: ") and expected in err, err
    assert not (tmp_path / "runs" / "sweep" / "run.json").exists()  # nothing written yet
    assert not (tmp_path / "runs" / "sweep" / "results.jsonl").exists()


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    rows = _token_pairs()
    rows[2]["wrong"] = 612
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        sweep.SweepConfigError, match=r"sweep\.yaml: prompts\.tokens: .*:3: token id 612"
    ):
        run_sweep(_write_config(tmp_path), out=tmp_path / "out", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_a_config_error(tmp_path, no_model_load):
    with pytest.raises(sweep.SweepConfigError, match=r"sweep\.yaml: device: expected a device"):
        load_config(_write_config(tmp_path, device="cuda"))


@pytest.mark.parametrize(
    ("overrides", "path", "suggestion"),
    [
        ({"metirc": "prob_diff"}, "sweep.yaml: metirc: unknown key", "'metric'"),
        ({"sweeps": [{"site": "z", "layer": [0]}]}, "sweeps[0].layer: unknown key", "'layers'"),
        ({"prompts": {"tokenz": "pairs.jsonl"}}, "prompts.tokenz: unknown key", "'tokens'"),
    ],
)
def test_unknown_key_suggests_the_closest(tmp_path, no_model_load, overrides, path, suggestion):
    with pytest.raises(sweep.SweepConfigError) as info:
        load_config(_write_config(tmp_path, **overrides))
    message = str(info.value)
    assert path in message and f"Did you mean {suggestion}?" in message, message
    assert isinstance(info.value, mk.MechkitError) and isinstance(info.value, ValueError)


def test_key_given_twice_and_broken_yaml_are_errors(tmp_path):
    path = _write_config(tmp_path)
    path.write_text(path.read_text() + "metric: prob_diff\n")
    with pytest.raises(sweep.SweepConfigError, match=r"line \d+: the key 'metric' is given twice"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(sweep.SweepConfigError, match="not valid YAML"):
        load_config(path)


def test_help_documents_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    keys = [f.name for f in dataclasses.fields(sweep.SweepConfig)]
    keys += [f"prompts.{f.name}" for f in dataclasses.fields(sweep.PromptSource)]
    keys += [f"sweeps[].{f.name}" for f in dataclasses.fields(SweepEntry)]
    documented = {line.split()[0] for line in text.splitlines() if line.startswith("  ")}
    assert set(keys) <= documented, set(keys) - documented
    for word in (
        "--restart",
        "--out",
        "resumes",
        *mk.patching.PATCHABLE,
        "repeated_tokens",
        "parquet",
    ):
        assert word in text


def test_config_round_trips_and_example_parses(no_model_load):
    config = load_config(ROOT / "examples" / "sweep_ioi.yaml")
    assert config.model == "smollm2-135m" and config.prompts.generator == "ioi"
    again = sweep.config_from_dict(config.to_dict())
    assert again == config


# ----------------------------------------------------------------------------------- running


@pytest.mark.parametrize("batch_size", [None, 2])
def test_scores_equal_activation_patch_on_all_pairs(toy, tmp_path, batch_size):
    path = _write_config(tmp_path, batch_size=batch_size)
    run = run_sweep(path, out=tmp_path / "out", progress=False)
    pairs = _pairs_from_file(tmp_path / "pairs.jsonl")
    metric = mk.LogitDiff.from_pairs(pairs)
    for name, (site, positions) in {
        "0_resid_pre": ("resid_pre", None),
        "1_z": ("z", "each"),
    }.items():
        ours = run.results[name]
        theirs = mk.activation_patch(
            toy, pairs, metric=metric, site=site, positions=positions, progress=False
        )
        assert ours.axes == theirs.axes and ours.labels == theirs.labels
        assert torch.allclose(ours.scores, theirs.scores, atol=TOL, rtol=0)
        assert torch.allclose(ours.per_prompt, theirs.per_prompt, atol=TOL, rtol=0)
        assert ours.clean_score == pytest.approx(theirs.clean_score, abs=TOL)
        assert ours.corrupt_score == pytest.approx(theirs.corrupt_score, abs=TOL)
    assert (theirs.scores - theirs.corrupt_score).abs().max() > 1  # the sweep finds something
    assert run.cells_computed == run.cells_total == (2 * 10 + 2 * 10 * 4) * (3 if batch_size else 1)


def test_mean_ablation_in_batches_uses_the_whole_dataset(toy, tmp_path):
    path = _write_config(tmp_path, ablation="mean", sweeps=[{"site": "attn_out"}])
    run = run_sweep(path, out=tmp_path / "out", progress=False)
    pairs = _pairs_from_file(tmp_path / "pairs.jsonl")
    theirs = mk.activation_patch(toy, pairs, site="attn_out", ablation="mean", progress=False)
    assert torch.allclose(run.results["0_attn_out"].scores, theirs.scores, atol=TOL, rtol=0)


def test_outputs_are_written(tmp_path):
    path = _write_config(tmp_path, format="parquet")
    out = tmp_path / "out"
    run = run_sweep(path, out=out, progress=False)
    for name in ("0_resid_pre", "1_z"):
        table = pd.read_csv(out / f"{name}.csv")
        assert {"layer", "pos", "score", "normalized", "prompt_4"} <= set(table.columns)
        assert len(table) == run.results[name].scores.numel()
        assert "plotly.min.js" in (out / f"{name}.html").read_text()
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "plotly.min.js").is_file()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and info["mechkit"] == mk.__version__
    assert info["config"]["sweeps"][1]["positions"] == "each"
    assert set(info["outputs"]) >= {"0_resid_pre.png", "1_z.csv", "results.parquet"}
    cells = pd.read_parquet(out / "results.parquet")
    assert len(cells) == run.cells_total == len(_journal_cells(out))
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_changed_config_is_refused_then_restarted(tmp_path):
    path = _write_config(tmp_path, sweeps=[{"site": "resid_pre"}])
    out = tmp_path / "out"
    run_sweep(path, out=out, progress=False)
    changed = load_config(
        _write_config(tmp_path, "changed.yaml", sweeps=[{"site": "resid_pre", "layers": [1]}])
    )
    with pytest.raises(mk.MechkitError, match=r"differs in sweeps\[0\]\.layers.*--restart"):
        run_sweep(changed, out=out, progress=False)
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _token_pairs(seed=4))
    )
    with pytest.raises(mk.MechkitError, match=r"differs in prompts\.tokens"):
        run_sweep(path, out=out, progress=False)  # same config, other prompts
    run = run_sweep(changed, out=out, restart=True, progress=False)
    assert run.results["0_resid_pre"].labels["layer"] == [1]
    assert len(_journal_cells(out)) == run.cells_total == 3 * 10
    # device, memory budget and format may change between runs
    again = dataclasses.replace(changed, memory_budget="1MB", format="parquet")
    assert run_sweep(again, out=out, progress=False).cells_computed == 0


def test_resume_after_a_torn_journal(tmp_path):
    path = _write_config(tmp_path)
    full = run_sweep(path, out=tmp_path / "full", progress=False)
    out = tmp_path / "cut"
    run_sweep(path, out=out, progress=False)
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    kept = lines[: len(lines) // 3]
    (out / "results.jsonl").write_text("".join(kept) + lines[len(kept)][:25])  # torn mid-line
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "status": "running"}))
    resumed = run_sweep(path, out=out, progress=False)
    done_before = sum(json.loads(line)["kind"] == "cell" for line in kept)
    assert resumed.cells_computed == resumed.cells_total - done_before
    assert max(Counter(_journal_cells(out)).values()) == 1
    for name, result in full.results.items():
        assert torch.allclose(resumed.results[name].scores, result.scores, atol=1e-5, rtol=0)


@pytest.mark.slow  # a sweep subprocess (importing mechkit), killed and resumed
def test_sweep_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    # one patch per forward pass (a tiny memory budget), so cells reach the journal one by one
    sweeps = [
        {"site": "resid_pre"},
        {"site": "z", "positions": "each"},
        {"site": "pattern", "positions": "each"},
        {"site": "v", "positions": "each"},
    ]
    path = _write_config(tmp_path, sweeps=sweeps, memory_budget="1KB")
    journal = tmp_path / "killed" / "results.jsonl"
    command = [sys.executable, "-m", "mechkit", "sweep", str(path), "--out", str(journal.parent)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "stderr.txt").open("w")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if journal.exists() and journal.read_bytes().count(b'"kind":"cell"') >= 150:
            break
        time.sleep(0.005)
    assert process.poll() is None, (tmp_path / "stderr.txt").read_text()  # running: kill it now
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    killed_at = len(_journal_cells(journal.parent))
    total = (2 * 10 + 3 * 2 * 10 * 4) * 3
    assert 150 <= killed_at < total
    assert json.loads((journal.parent / "run.json").read_text())["status"] == "running"

    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{total} cells ({total - killed_at} computed now)" in done.stdout
    cells = _journal_cells(journal.parent)
    assert len(cells) == total and max(Counter(cells).values()) == 1  # no cell twice

    reference = run_sweep(path, out=tmp_path / "uninterrupted", progress=False)
    for name in reference.results:
        ours = pd.read_csv(journal.parent / f"{name}.csv")
        theirs = pd.read_csv(tmp_path / "uninterrupted" / f"{name}.csv")
        # equal up to float rounding: a resumed run batches its remaining cells differently
        pd.testing.assert_frame_equal(ours, theirs, check_exact=False, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_example_config_runs_on_smollm2(smollm2, tmp_path):
    config = load_config(ROOT / "examples" / "sweep_ioi.yaml")
    config = dataclasses.replace(  # the example, cut down to a few seconds on a CPU
        config,
        prompts=dataclasses.replace(config.prompts, n=2),
        sweeps=(SweepEntry(site="resid_pre", layers=(0, 29)), SweepEntry(site="z", layers=(29,))),
        batch_size=1,
        device="cpu",
    )
    run = run_sweep(config, out=tmp_path / "ioi", progress=False)
    pairs = build_pairs(smollm2, config)
    resid = mk.activation_patch(smollm2, pairs, site="resid_pre", layers=[0, 29], progress=False)
    ours = run.results["0_resid_pre"]
    assert torch.allclose(ours.scores, resid.scores, atol=1e-4, rtol=0)
    assert ours.clean_score > ours.corrupt_score + 1  # the IOI prompts work on this model
    assert run.results["1_z"].scores.shape == (1, 9)
    assert (tmp_path / "ioi" / "1_z.png").stat().st_size > 1000


def test_two_runs_never_share_an_output_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with sweep._locked(out):  # as a sweep running in another process holds it
        with pytest.raises(mk.MechkitError, match="another mechkit sweep holds it"):
            run_sweep(_write_config(tmp_path), out=out, progress=False)
    assert not (out / "results.jsonl").exists()


# ----------------------------------------------------------------------------------- output folder
# A sweep deletes or overwrites only files it can show it wrote; everything else is refused with
# an OutputFolderError naming the file, and left as it was.


def _small_config(tmp_path: Path, name: str = "sweep.yaml", **overrides) -> Path:
    return _write_config(tmp_path, name, **{"sweeps": [{"site": "resid_pre"}], **overrides})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("restart", [False, True])
def test_foreign_results_jsonl_is_not_deleted(tmp_path, monkeypatch, capsys, restart):
    monkeypatch.chdir(tmp_path)
    _small_config(tmp_path)
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "results.jsonl").write_text('{"loss": 1.5, "step": 10}\n{"loss": 1.2, "step": 20}\n')
    before = _snapshot(out)
    argv = ["sweep", "sweep.yaml", "--out", "theirs", "--no-progress"]
    assert main(argv + (["--restart"] if restart else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechkit: error: ") and "results.jsonl" in err and "Hint:" in err, err
    assert "is not a sweep journal" in err and "Traceback" not in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["results.jsonl", "run.json"])
def test_folder_named_like_the_journal_or_run_file_is_refused(tmp_path, no_model_load, name):
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "keep.txt").write_text("mine")
    with pytest.raises(mk.OutputFolderError, match=rf"{name} is not a"):
        run_sweep(_small_config(tmp_path), out=out, restart=True, progress=False)
    assert (out / name / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("restart", [False, True])
def test_foreign_run_json_and_the_files_it_lists_are_not_deleted(tmp_path, restart):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"tool": "other", "outputs": ["data.csv"]}))
    (out / "data.csv").write_text("a,b\n1,2\n")
    (out / "results.parquet").write_bytes(b"PAR1 someone else's table")
    before = _snapshot(out)
    with pytest.raises(mk.OutputFolderError, match=r"run\.json is not a run file of mechkit"):
        run_sweep(_small_config(tmp_path), out=out, restart=restart, progress=False)
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["0_resid_pre.csv", "0_resid_pre.png", "results.parquet"])
def test_foreign_file_named_like_an_output_is_not_overwritten(tmp_path, no_model_load, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the user's own file")
    with pytest.raises(mk.OutputFolderError, match=rf"{name} was not written by this sweep"):
        run_sweep(_small_config(tmp_path, format="parquet"), out=out, progress=False)
    assert (out / name).read_bytes() == b"the user's own file"  # refused before any model loads


def test_restart_refuses_an_output_edited_after_the_sweep_wrote_it(tmp_path):
    path = _small_config(tmp_path)
    out = tmp_path / "out"
    run_sweep(path, out=out, progress=False)
    with (out / "0_resid_pre.csv").open("a") as f:
        f.write("# my notes on this table\n")
    before = _snapshot(out)
    for restart in (True, False):  # restart deletes it; a rerun of a complete sweep rewrites it
        with pytest.raises(mk.OutputFolderError, match=r"0_resid_pre\.csv was changed after"):
            run_sweep(path, out=out, restart=restart, progress=False)
        assert _snapshot(out) == before  # nothing deleted, not even the journal


def test_restart_deletes_its_own_outputs_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    run_sweep(_small_config(tmp_path), out=out, progress=False)
    (out / "notes.txt").write_text("mine")
    renamed = _small_config(tmp_path, "b.yaml", sweeps=[{"site": "resid_pre", "name": "b"}])
    run_sweep(renamed, out=out, restart=True, progress=False)
    names = {p.name for p in out.iterdir()} - {".lock"}
    assert names == {"notes.txt", "results.jsonl", "run.json", "plotly.min.js", *_outs("b")}
    info = json.loads((out / "run.json").read_text())
    assert set(info["outputs"]) == {"plotly.min.js", *_outs("b")}
    assert (out / "notes.txt").read_text() == "mine"


def _outs(name: str) -> set[str]:
    return {f"{name}.csv", f"{name}.html", f"{name}.png"}


@pytest.mark.parametrize("listed", ["../victim.txt", "VICTIM", "link.csv"])
def test_restart_never_follows_outputs_outside_the_folder(tmp_path, listed):
    out = tmp_path / "out"
    run_sweep(_small_config(tmp_path), out=out, progress=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("not the sweep's")
    listed = str(victim) if listed == "VICTIM" else listed  # an absolute path
    (out / "link.csv").symlink_to(victim)
    info = json.loads((out / "run.json").read_text())
    if isinstance(info["outputs"], list):  # a run file without content records
        info["outputs"].append(listed)
    else:
        info["outputs"][listed] = info["outputs"]["0_resid_pre.csv"]
    (out / "run.json").write_text(json.dumps(info))
    before = _snapshot(out)
    with pytest.raises(mk.OutputFolderError, match="run.json|link.csv") as caught:
        run_sweep(_small_config(tmp_path), out=out, restart=True, progress=False)
    assert "Hint:" in str(caught.value)
    assert victim.read_text() == "not the sweep's" and (out / "link.csv").is_symlink()
    assert _snapshot(out) == before


def test_symlink_in_the_folder_is_never_written_through(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "plotly.min.js").symlink_to(elsewhere / "plotly.min.js")  # dangling: plotly writes it
    with pytest.raises(mk.OutputFolderError, match=r"plotly\.min\.js is a link"):
        run_sweep(_small_config(tmp_path), out=out, progress=False)
    assert not list(elsewhere.iterdir())


def test_killed_while_replacing_outputs_resumes(tmp_path, monkeypatch):
    path = _small_config(tmp_path)
    out = tmp_path / "out"
    run_sweep(path, out=out, progress=False)
    real = os.replace

    def killed_before_the_png(src, dst):  # a kill between renaming two outputs into place
        if str(dst).endswith(".png"):  # the HTML (new content: plotly's ids are random) is in
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_the_png)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, out=out, progress=False)
    monkeypatch.setattr(os, "replace", real)
    again = run_sweep(path, out=out, progress=False)  # recognises every file as its own
    assert again.cells_computed == 0
    run_sweep(path, out=out, restart=True, progress=False)


def test_out_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    _small_config(tmp_path)
    (tmp_path / "taken").write_text("a file")
    assert main(["sweep", "sweep.yaml", "--out", "taken", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechkit: error: Expected --out to be a folder; taken is a file"), err
    assert "Hint:" in err and (tmp_path / "taken").read_text() == "a file"


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made unwritable, also for root (immutable); skips where neither works."""
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)]).returncode == 0
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            yield
        else:
            (folder / "probe").unlink()
            pytest.skip("cannot make a read-only folder here")
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_out_folder_is_a_clear_error(tmp_path, monkeypatch, capsys, no_model_load):
    monkeypatch.chdir(tmp_path)
    _small_config(tmp_path)
    (tmp_path / "locked").mkdir()
    with _read_only(tmp_path / "locked"):
        assert main(["sweep", "sweep.yaml", "--out", "locked", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mechkit: error: Expected an output folder that can be written to; ")
    assert "locked cannot" in err and "Hint:" in err, err


def test_prompts_longer_than_n_ctx_are_refused_before_any_forward(tmp_path, monkeypatch, capsys):
    rows = _token_pairs()
    rows[3]["clean"] = rows[3]["clean"] * 12  # 120 tokens: still fits the toy's 128
    rows[3]["corrupt"] = rows[3]["corrupt"] * 12
    rows[1]["clean"] = rows[1]["clean"] * 14  # 140 tokens (the corrupt prompt stays short)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _write_config(tmp_path, ablation="zero", sweeps=[{"site": "resid_pre"}])

    def refuse(*args, **kwargs):
        raise AssertionError("a forward pass ran on prompts longer than n_ctx")

    monkeypatch.setattr(HookedTransformer, "forward", refuse)
    with pytest.raises(mk.ContextLengthError) as caught:
        run_sweep(path, out=tmp_path / "out", progress=False)
    assert isinstance(caught.value, sweep.SweepConfigError)
    assert str(caught.value).startswith(
        f"{path}: prompts.tokens: expected prompts of at most 128 tokens (the model's context, "
        "n_ctx); 1 pair(s) are longer, the longest pair 2 with 140 tokens. Hint: "
    )
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "sweep.yaml", "--out", "out", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mechkit: error: sweep.yaml: prompts.tokens: expected prompts of at most")


def _damage(line: str, how: str) -> str:
    record = json.loads(line)
    if how == "not json":
        return line[: len(line) // 2] + "\n"
    if how == "a list":
        return "[1, 2]\n"
    if how == "score a string":
        record["score"] = "high"
    elif how == "no cell field":
        del record["cell"]
    elif how == "cell outside the grid":
        record["cell"] = [0, 99]
    elif how == "cell of no plan":
        record["batch"] = 7
    elif how == "unknown kind":
        record["kind"] = "note"
    return json.dumps(record) + "\n"


@pytest.mark.parametrize(
    "how",
    [
        "not json",
        "a list",
        "score a string",
        "no cell field",
        "cell outside the grid",
        "cell of no plan",
        "unknown kind",
    ],
)
def test_malformed_journal_record_in_the_middle_is_a_clear_error(
    tmp_path, monkeypatch, capsys, how
):
    monkeypatch.chdir(tmp_path)
    _small_config(tmp_path)
    assert main(["sweep", "sweep.yaml", "--out", "out", "--no-progress"]) == 0
    journal = tmp_path / "out" / "results.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    k = next(i for i, line in enumerate(lines) if '"kind":"cell"' in line) + 3
    lines[k] = _damage(lines[k], how)
    journal.write_text("".join(lines))
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    (tmp_path / "out" / "run.json").write_text(json.dumps({**info, "status": "running"}))
    capsys.readouterr()
    assert main(["sweep", "sweep.yaml", "--out", "out", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mechkit: error: Expected {Path('out') / 'results.jsonl'} to hold "), err
    assert f"line {k + 1} " in err and "--restart" in err and "Traceback" not in err
    with pytest.raises(mk.FileFormatError):
        run_sweep(load_config("sweep.yaml"), out="out", progress=False)
    # --restart discards the damaged journal, which is still recognisably this sweep's
    assert main(["sweep", "sweep.yaml", "--out", "out", "--no-progress", "--restart"]) == 0
