"""`msd-engine train-data -> train -> convert msd-draft -> eval-draft` end to end on the tiny LLaVA."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from msd_engine.cli import main
from tests.test_train_data import make_dataset


def test_end_to_end(tiny_llava_dir, tmp_path, capsys):
    data = make_dataset(tmp_path)
    shards, run, draft = tmp_path / "shards", tmp_path / "run", tmp_path / "draft"
    assert main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--images", str(tmp_path / "img"),
                 "--out", str(shards), "--max-len", "200", "--shard-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 records in 2 shard(s)" in out and "too_long 1" in out and "missing_image 1" in out
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(shards), "--out", str(run), "--epochs", "3",
                 "--lr", "1e-3", "--warmup", "2"]) == 0
    out = capsys.readouterr().out
    ckpt = run / out.split("final checkpoint: ")[1].split(" ")[0].split("/")[-1]
    assert (ckpt / "model.safetensors").is_file() and (run / "metrics.jsonl").is_file()
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["convert", "msd-draft", str(ckpt), str(draft), "--dtype", "float32"]) == 0
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "Hi"}, {"prompt": "What is this?", "image": "blue.png"}]))
    capsys.readouterr()
    base = ["eval-draft", "--model", str(tiny_llava_dir), "--draft", str(draft), "--prompts", str(prompts),
            "--max-new-tokens", "8"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "with_image: 1 prompts, tau" in out and "text_only: 1 prompts, tau" in out
    assert main(base + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for group in ("with_image", "text_only"):
        r = report[group]
        assert r["prompts"] == 1 and r["tau"] >= 1.0
        assert sum(int(k) * v for k, v in r["accepted_histogram"].items()) / r["verify_forwards"] == r["tau"]


@pytest.mark.parametrize("argv", [
    ["train-data", "--model", "M", "--data", "D.json"],                 # --out missing
    ["train", "--model", "M", "--data", "S", "--out", "O", "--mode", "medusa"],
    ["eval-draft", "--model", "M", "--prompts", "P.json"],              # --draft missing
    ["train", "--model", "M", "--data", "S", "--out", "O", "--epochs", "x"],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_bad_values_exit_2_with_one_line(tiny_llava_dir, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--epochs", "0"]) == 2
    assert main(["train", "--model", str(tiny_llava_dir), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--epochs", "2"]) == 2  # no manifest
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: --epochs must be >= 1, got 0" and "manifest" in err[1] and len(err) == 2


def test_init_from_fine_tunes_with_the_checkpoints_vocabulary(tiny_llava_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    data = make_dataset(tmp_path)
    shards = tmp_path / "shards"
    assert main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--images", str(tmp_path / "img"),
                 "--out", str(shards), "--max-len", "200"]) == 0
    def train(*extra, data=(shards,)):
        return ["train", "--model", str(tiny_llava_dir), "--data", *map(str, data), "--epochs", "1", "--warmup", "1",
                *extra]

    assert main(train("--out", str(tmp_path / "small"), "--draft-vocab", "16")) == 0
    out = capsys.readouterr().out
    first = tmp_path / "small" / out.split("final checkpoint: ")[1].split(" ")[0].split("/")[-1]
    records = int(out.split(" records")[0].split()[-1])
    # fine-tuned on two shard directories (here the same one twice): their records in turn
    # another seed would start a fresh draft far from `first`; an lr of 1e-12 leaves the loaded one
    assert main(train("--out", str(tmp_path / "tuned"), "--init-from", str(first), "--seed", "1", "--lr", "1e-12",
                      data=(shards, shards))) == 0
    out = capsys.readouterr().out
    assert f"{2 * records} records" in out
    tuned = tmp_path / "tuned" / out.split("final checkpoint: ")[1].split(" ")[0].split("/")[-1]
    before, after = load_file(str(first / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    assert before["draft_vocab"].numel() == 16 and before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=0)
    assert main(train("--out", str(tmp_path / "unrolled"), "--init-from", str(first), "--unroll-steps", "2")) == 0
    capsys.readouterr()
    rows = (tmp_path / "unrolled" / "metrics.jsonl").read_text().splitlines()
    assert rows and all("acc_2" in json.loads(r) and "acc_3" not in json.loads(r) for r in rows)
    assert main(train("--out", str(tmp_path / "u0"), "--unroll-steps", "0")) == 2
    assert "unroll_steps must be an int >= 1, got 0" in capsys.readouterr().err
    assert main(train("--out", str(tmp_path / "ce"), "--init-from", str(first), "--ce-weight", "0.5")) == 0
    capsys.readouterr()
    rows = [json.loads(r) for r in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss"] == pytest.approx(r["feature_loss"] + 0.5 * r["ce_loss"], rel=1e-5) for r in rows)
    assert main(train("--out", str(tmp_path / "ce-bad"), "--ce-weight", "-1")) == 2
    assert "ce_weight must be a finite number >= 0, got -1.0" in capsys.readouterr().err
    assert main(train("--out", str(tmp_path / "x"), "--init-from", str(first), "--draft-vocab", "16")) == 2
    assert main(train("--out", str(tmp_path / "y"), "--init-from", str(tmp_path / "nowhere"))) == 2
    assert main(train("--out", str(tmp_path / "z"), data=(data, data))) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "--draft-vocab with --init-from" in err[0] and "nowhere" in err[1]
    assert "shard directories or one conversations JSON, got 2 paths" in err[2]
