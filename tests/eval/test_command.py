"""`python -m lctrain eval`: results table, JSON, TensorBoard; one-line errors with exit code 2."""
import json
import shutil

import pytest

from lctrain.cli import main


def _run(capsys, *argv):
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mqar_on_a_run_writes_table_json_and_tensorboard(run_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, _ = _run(capsys, str(run_dir), "--task", "mqar", "--lengths", "64", "--kv-pairs", "2,4",
                           "--trials", "8", "--out", str(out), "--no-progress")
    assert code == 0 and "num_kv_pairs" in stdout
    payload = json.loads(out.read_text())
    assert payload["step"] == 3 and payload["settings"]["task_vocab"] == 64  # taken from the run's mqar source
    assert [r["num_kv_pairs"] for r in payload["results"]] == [2, 4]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    again = tmp_path / "r2.json"
    _run(capsys, str(run_dir), "--task", "mqar", "--lengths", "64", "--kv-pairs", "2,4", "--trials", "8",
         "--out", str(again), "--no-progress", "--no-tensorboard")
    assert json.loads(again.read_text())["results"] == payload["results"]


def test_ppl_and_niah_from_the_command_line(run_dir, tmp_path, capsys):
    text = tmp_path / "doc.txt"
    text.write_text("The grass is green. The sky is blue. " * 30)
    code, stdout, _ = _run(capsys, str(run_dir / "checkpoints" / "step-3"), "--task", "ppl", "--data", str(text),
                           "--lengths", "32,128", "--no-progress", "--out", str(tmp_path / "p.json"))
    assert code == 0 and [r["length"] for r in json.loads((tmp_path / "p.json").read_text())["results"]] == [32, 128]
    code, stdout, _ = _run(capsys, str(run_dir), "--task", "niah", "--lengths", "80", "--depths", "0,1",
                           "--trials", "1", "--no-progress", "--out", str(tmp_path / "n.json"), "--no-tensorboard")
    assert code == 0 and (tmp_path / "niah.png").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--task", "bogus"], "invalid choice: 'bogus'"),
    (["--task", "mqar", "--lengths", "4096"], "--lengths: 4096 exceeds the longest supported context 1024"),
    (["--task", "ppl", "--data", "/nonexistent/file.txt"], "--data: file not found"),
    (["--task", "mqar", "--lengths", "x,2"], "is not a comma-separated list of integers"),
])
def test_bad_input_is_one_line_and_exit_code_2(run_dir, capsys, argv, message):
    code, _, err = _run(capsys, str(run_dir), *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_path_and_missing_tokenizer(run_dir, tmp_path, capsys):
    code, _, err = _run(capsys, str(tmp_path / "nope"), "--task", "mqar")
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("tokenizer", "tb"))
    code, _, err = _run(capsys, str(bare), "--task", "passkey", "--lengths", "64")
    assert code == 2 and "has no tokenizer" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, str(bare), "--task", "mqar", "--lengths", "64", "--kv-pairs", "4", "--trials", "4",
                        "--no-progress")
    assert code == 0, err  # MQAR is token-level: no tokenizer needed
