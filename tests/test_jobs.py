"""The job runtime (po_plugins.jobs) and the library side of the scoring / generation / labelling commands, on CPU
without models: options, plans, part files and resume, atomic output, typed errors, and the CLIs as thin layers."""

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from po_plugins import jobs
from po_plugins.errors import DataError, HostError, OptionError

ROOT = Path(__file__).resolve().parents[1]
JOB_CLIS = ("score_margins", "generate", "label_pairs")


class Bar:
    def __init__(self):
        self.n, self.closed = 0, False

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


def run_loop(out, fp, batches, every=2, stop_env="PO_TEST_STOP"):
    jobs.checkpointed_loop(batches, lambda b: [{"i": i, "v": 10 * i} for i in b], out, fp, 0, 1, every, stop_env,
                           Bar())


# ------------------------------------------------------------------------------------------------------ options
def test_nest_options_and_shared_checks(capsys):
    args = jobs.nest_options({"model": "m", "data.dataset": "d.jsonl", "data.input_template": "Q"})
    assert args.model == "m" and args.data.dataset == "d.jsonl" and not hasattr(args, "data.dataset")
    jobs.check_input_template(args.data, "train_rm")
    assert args.data.input_template is None
    assert "(as openrlhf.cli.train_rm does)" in capsys.readouterr().err
    jobs.check_job_options("o.parquet", None, 1)  # batch_size None: chosen later
    with pytest.raises(OptionError, match="--batch_size and --checkpoint_every must be >= 1"):
        jobs.check_job_options("o.jsonl", 0, 1)
    with pytest.raises(OptionError, match=r"--output must end in one of \.jsonl, \.json, \.parquet, got o\.csv"):
        jobs.check_job_options("o.csv", 4, 1)
    with pytest.raises(DataError, match=r"x.jsonl has no column 'q' \(set --data.prompt_key to the right column\)"):
        jobs.require_columns(["prompt"], {"--data.chosen_key": None, "--data.prompt_key": "q"}, source="x.jsonl")


def test_plans_are_independent_of_the_number_of_processes():
    lengths = [5, 9, 1, 9, 3, 7, 2]
    plan = jobs.plan_batches(lengths, 2)
    assert plan == [[1, 3], [5, 0], [4, 6], [2]]
    shares = [jobs.my_batches(plan, r, 3) for r in range(3)]
    assert shares == [[[1, 3], [2]], [[5, 0]], [[4, 6]]]
    assert jobs.my_batches(plan, 0, 1, finished=lambda b: 0 in b) == [[1, 3], [4, 6], [2]]
    assert jobs.gather_lengths(lambda items: [lengths[i] for i in items], len(lengths), 0, 1) == lengths


def test_check_finite_names_the_input_rows():
    c, r = torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([0.0, 1.0, float("inf")])
    jobs.check_finite({"reward": (c[:1], r[:1])}, [7])
    with pytest.raises(DataError, match=r"non-finite reward \(nan/inf\) for 2 pair\(s\).*\(0-based\): \[4, 9\]\."):
        jobs.check_finite({"reward": (c, r)}, [7, 9, 4])


def test_default_device_and_say(capsys):
    from po_plugins import generation

    assert generation.default_device is jobs.default_device  # one copy
    assert jobs.default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    jobs.rank0_say(0)("hello", 3)
    jobs.rank0_say(1)("quiet")
    assert capsys.readouterr().err == "po_plugins: hello 3\n"


# ------------------------------------------------------------------------------------------------- fingerprints
def test_fingerprints_follow_the_files(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    stamp = jobs.data_stamp(f"{data}, hub/name@sub")
    assert stamp[0][0] == str(data.resolve()) and stamp[0][1][0][:2] == ["d.jsonl", 3] and stamp[1] == "hub/name"
    assert jobs.path_stamp(None) is None and jobs.path_stamp(tmp_path / "no") == tmp_path / "no"
    assert [f[0] for f in jobs.file_stamp(tmp_path)] == ["d.jsonl"]
    fp = jobs.fingerprint({"data": stamp, "n": 1})
    assert len(fp) == 16 and fp == jobs.fingerprint({"n": 1, "data": jobs.data_stamp(f"{data}, hub/name@sub")})
    data.write_text("{}\n{}\n")
    assert fp != jobs.fingerprint({"data": jobs.data_stamp(f"{data}, hub/name@sub"), "n": 1})


# --------------------------------------------------------------------------------------------------- part files
def test_checkpointed_loop_resume_and_refusal(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sub" / "o.jsonl"
    batches = [[0, 1], [2], [3, 4], [5]]
    assert jobs.start_parts(out, "fp1", False, 0, 1, "x") == {}
    monkeypatch.setenv("PO_TEST_STOP", "3")
    with pytest.raises(SystemExit) as stop:  # a simulated crash after 3 batches: only 2 were checkpointed
        run_loop(out, "fp1", batches)
    assert stop.value.code == 3 and "PO_TEST_STOP=3: stopping (rank 0) after 3 batches" in capsys.readouterr().err
    monkeypatch.delenv("PO_TEST_STOP")
    assert jobs.part_files(out) == [f"{out}.partial.jsonl"]
    with open(f"{out}.partial.jsonl", "a") as f:
        f.write('{"i": 9, "v"')  # a torn last line
    done = jobs.start_parts(out, "fp1", True, 0, 1, "x")
    assert done == {0: {"v": 0}, 1: {"v": 10}, 2: {"v": 20}}
    with pytest.raises(DataError, match=r"o.jsonl.partial.jsonl was written for other inputs \(the seed differs\); "
                                        "delete it or run without --resume"):
        jobs.start_parts(out, "fp2", True, 0, 1, differs="the seed differs")
    assert jobs.start_parts(out, "fp2", False, 0, 1, "x") == {} and jobs.part_files(out) == []  # stale parts removed
    run_loop(out, "fp1", batches)
    assert jobs.read_parts(out, "fp1", "x") == {i: {"v": 10 * i} for i in range(6)}


def test_publish_writes_atomically_and_removes_parts(tmp_path):
    from datasets import Dataset, load_dataset

    raw = Dataset.from_list([{"id": "a", "m": 1.0, "meta": {"k": 0}}, {"id": "b", "m": 2.0, "meta": {"k": 1}}])
    out = tmp_path / "o.jsonl"
    jobs.append_part(jobs.part_path(out, 1), "fp", ['{"i": 0}\n'])
    assert jobs.part_files(out) == [f"{out}.partial.rank1.jsonl"]
    jobs.publish(raw, {"m": [5.0, 6.0], "new": [[1], [2]]}, out)
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        {"id": "a", "m": 5.0, "meta": {"k": 0}, "new": [1]}, {"id": "b", "m": 6.0, "meta": {"k": 1}, "new": [2]}]
    assert jobs.part_files(out) == [] and not list(tmp_path.glob("*.tmp-*"))
    jobs.write_output(raw, {"m": [5.0, 6.0]}, tmp_path / "o.parquet")
    pq = load_dataset("parquet", data_files=str(tmp_path / "o.parquet"))["train"]
    assert pq["id"] == ["a", "b"] and pq["m"] == [5.0, 6.0]


# ----------------------------------------------------------------------------------------- the jobs' own options
def test_job_options_raise_typed_errors(tmp_path):
    from po_plugins import generation
    from po_plugins.reward_models import detect_rm_kind, hf_rm, labels, scoring

    args = SimpleNamespace(margin_key="margin", ref_model=None, output="o.jsonl", batch_size=1, checkpoint_every=1)
    with pytest.raises(OptionError, match="must not be 'margin'"):
        scoring.check_options(args)
    args.margin_key, args.ref_model = "ref_chosen_logp", "sft"
    with pytest.raises(OptionError, match="collides with a --ref_model column"):
        scoring.check_options(args)
    with pytest.raises(OptionError, match="no config.json there"):
        detect_rm_kind(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(DataError, match="config.json is not a JSON object"):
        detect_rm_kind(tmp_path)
    data = SimpleNamespace(**{**{k: None for k in jobs.FORMAT_FLAGS}, "apply_chat_template": True})
    with pytest.raises(OptionError, match=r"^--data.apply_chat_template: OpenRLHF reward-model option, .*drop it$"):
        hf_rm.check_flags(data, None, "rm")
    with pytest.raises(OptionError, match="rm:RM_DIR or fn:module:function"):
        labels.parse_reward("x.y")
    with pytest.raises(OptionError, match="no config.json there"):
        labels.parse_reward(f"rm:{tmp_path / 'none'}")
    assert labels.parse_reward("fn:mod:f") == ("fn", ("mod", "f"))
    with pytest.raises(OptionError, match="cannot import it"):
        labels.load_function("po_plugins.jobs", "no_such_function")
    with pytest.raises(OptionError, match="is not callable"):
        labels.load_function("po_plugins.jobs", "OUTPUT_SUFFIXES")
    sampling = dict(n_samples=2, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4, seed=0)
    assert generation.sampling_options(SimpleNamespace(**sampling)).n_samples == 2
    with pytest.raises(OptionError, match=r"^--top_p must be in \(0, 1\]$"):
        generation.sampling_options(SimpleNamespace(**{**sampling, "top_p": 0}))


def test_openrlhf_backend_checks_the_host_first(monkeypatch):
    from po_plugins.hosts import openrlhf as host
    from po_plugins.reward_models import openrlhf_rm

    def refuse(version=None):
        raise HostError("OpenRLHF 0.0 is not supported (test)")

    monkeypatch.setattr(host, "check_host", refuse)
    openrlhf_rm.ensure_host.cache_clear()
    try:
        for call in (lambda: openrlhf_rm.load_reward_model("no-such-rm"), lambda: openrlhf_rm.load_ref_model("x"),
                     lambda: openrlhf_rm.rm_scorer(None, None, None), lambda: openrlhf_rm.ref_scorer(None, None, None),
                     lambda: openrlhf_rm.reward_dataset(None, None, None)):
            with pytest.raises(HostError, match="not supported"):
                call()
    finally:
        openrlhf_rm.ensure_host.cache_clear()


# ------------------------------------------------------------------------------------------------- the CLIs
def test_job_clis_import_no_other_cli_and_turn_errors_into_one_line(tmp_path):
    for name in JOB_CLIS:
        tree = ast.parse((ROOT / "po_plugins" / "cli" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m for m in imported if m and m.startswith("po_plugins.cli")} <= {"po_plugins.cli._common"}, name
    from po_plugins.cli import generate, label_pairs

    base = ["--model", "m", "--data.dataset", "d.jsonl", "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match=r"^po_plugins: --temperature must be >= 0"):
        generate.main(base + ["--temperature", "-1"])
    with pytest.raises(SystemExit, match=r"^po_plugins: --output must end in one of"):
        label_pairs.main(["--input", "g.jsonl", "--output", "o.csv", "--reward", "fn:m:f"])
