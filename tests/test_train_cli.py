"""`python -m fastsae train` end to end on CPU: a tiny randomly initialised GPT-2 saved from a config
(no download), a text file, two hook points, logging, checkpoints and a resumed run; the same command
under torchrun (2 processes, gloo) as 2 data-parallel replicas and as 2 feature shards."""

import argparse
import csv
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import fastsae
from fastsae import train
from fastsae.__main__ import main as cli

from .test_activations import WORDS, _gpt2, _texts, _tokenizer

pytest.importorskip("transformers")


@pytest.fixture
def model_dir(tmp_path):
    directory = tmp_path / "tiny-gpt2"
    _gpt2().save_pretrained(directory)
    _tokenizer().save_pretrained(directory)
    return directory


def _rows(out, name="log.csv"):
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


def test_resumed_tables_keep_rows_up_to_the_checkpoint(tmp_path, capsys):
    """A resumed run's table loses the rows after its checkpoint and a row cut short, atomically, and
    is left as it is where nothing goes."""
    columns = ["tokens", "hookpoint", "fvu"]
    path = tmp_path / "log.csv"
    train._keep_rows_up_to(path, columns, 512)  # no table yet: none is made
    assert not path.exists()
    path.write_text("tokens,hookpoint,fvu\r\n256,a,0.5\r\n512,a,0.4\r\n768,a,0.3\r\n1024,a,0.")
    train._keep_rows_up_to(path, columns, 512)
    assert path.read_bytes() == b"tokens,hookpoint,fvu\r\n256,a,0.5\r\n512,a,0.4\r\n"
    assert "left out 2 rows logged after 512 tokens" in capsys.readouterr().out
    before = path.stat()
    train._keep_rows_up_to(path, columns, 512)
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns, "rewritten"
    path.write_text("tokens,hookpoint,fvu\r\n256,a,0.5\r\n256,b")  # the last row cut at its end
    train._keep_rows_up_to(path, columns, 1024)
    assert _rows(tmp_path) == [{"tokens": "256", "hookpoint": "a", "fvu": "0.5"}]
    path.write_text("toke")  # stopped while writing the header
    train._keep_rows_up_to(path, columns, 0)
    assert path.read_bytes() == b"tokens,hookpoint,fvu\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"], "a temporary file was left"


def test_train_command_logs_checkpoints_and_resumes(tmp_path, model_dir, capsys):
    texts = tmp_path / "corpus.txt"
    texts.write_text("\n".join(t.replace("[BOS] ", "") for t in _texts(400, seed=3)) + "\n")
    out = tmp_path / "run"
    common = ["train", "--model", str(model_dir), "--hookpoint", "h.0", "h.1", "--texts", str(texts),
              "--out", str(out), "--batch-tokens", "64", "--diagnose-tokens", "128", "--expansion-factor", "4",
              "--k", "4", "--log-every", "256", "--checkpoint-every", "512", "--device", "cpu"]  # fmt: skip
    held_out = ["--eval-texts", str(texts), "--eval-tokens", "100"]  # (the training texts: any will do here)
    assert cli([*common, "--tokens", "1024", *held_out]) == 0
    printed = capsys.readouterr().out
    assert "== h.0: diagnose" in printed and "| recommendation |" in printed
    assert printed.count("h.1: loss recovered") == 2  # at the checkpoints, 512 and 1024 tokens
    evaluations = _rows(out, "eval.csv")
    assert [(int(row["tokens"]), row["hookpoint"]) for row in evaluations] == [
        (512, "h.0"), (512, "h.1"), (1024, "h.0"), (1024, "h.1")
    ]  # fmt: skip
    assert all(float(row["l0"]) == 4 and float(row["loss_clean"]) > 0 for row in evaluations)
    rows = _rows(out)
    assert {row["hookpoint"] for row in rows} == {"h.0", "h.1"}
    assert int(rows[-1]["tokens"]) == 1024 and all(0 <= float(row["fvu"]) < 10 for row in rows)
    assert matplotlib.image.imread(out / "training.png").shape[1] == 3 * 500  # FVU, dead %, loss recovered
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["tokens"] == 1024 and state["optimizer"] == "saeadam"  # the default
    first = fastsae.SparseAutoencoder.load(out / "h.0.safetensors")
    assert first.cfg.n_features == 4 * 16 and first.cfg.k == 4

    # A run stopped after logging 1280 tokens, one row cut short, resumes from its checkpoint at 1024.
    with open(out / "log.csv", "a", newline="") as f:
        f.write("1280,h.0,9.99999,0.00,1\r\n1280,h.1,0.123")
    assert cli([*common, "--tokens", "1536", "--model-dtype", "float32"]) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed_rows = _rows(out)
    assert resumed_rows[: len(rows)] == rows and int(resumed_rows[-1]["tokens"]) == 1536
    for name in ("h.0", "h.1"):  # each count once: the stopped run's rows after the checkpoint are gone
        tokens = [int(row["tokens"]) for row in resumed_rows if row["hookpoint"] == name]
        assert tokens == [256, 512, 768, 1024, 1280, 1536], tokens
    assert all(row["fvu"] != "9.99999" for row in resumed_rows)
    resumed = fastsae.SparseAutoencoder.load(out / "h.0.safetensors")
    assert not torch.equal(resumed.W_dec, first.W_dec), "the resumed run did not train"
    assert int(resumed.n_tokens_seen) == 1536  # statistics continued from the checkpoint


def test_train_command_explains_bad_input(tmp_path, model_dir, capsys):
    args = ["train", "--model", str(model_dir), "--hookpoint", "h.0", "--device", "cpu", "--out", str(tmp_path / "o")]
    assert cli([*args, "--texts", str(tmp_path / "missing.txt")]) == 2
    assert "no such text file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "the cat"}\n')
    assert cli([*args, "--texts", str(bad)]) == 2
    assert "bad.jsonl:1: not a JSON object with a 'text' field" in capsys.readouterr().err
    good = tmp_path / "good.txt"
    good.write_text(" ".join(WORDS) + "\n")
    assert cli([*args[:4], "h.9", *args[5:], "--texts", str(good)]) == 2
    assert "no submodule 'h.9'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source, shards",
    [("texts", 1), ("texts", 2), ("activations", 1)],
    ids=["2 replicas", "2 feature shards", "2 replicas on saved activations"],
)
def test_train_command_under_torchrun(tmp_path, model_dir, source, shards):
    out = tmp_path / "run"
    if source == "texts":
        texts = tmp_path / "corpus.txt"
        texts.write_text("\n".join(t.replace("[BOS] ", "") for t in _texts(400, seed=3)) + "\n")
        inputs = ["--model", str(model_dir), "--hookpoint", "h.0", "--texts", str(texts), "--eval-texts", str(texts),
                  "--eval-tokens", "100"]  # fmt: skip
    else:  # named h.0 by its stem, like the model's hook point
        torch.save(torch.randn(600, 16, generator=torch.Generator().manual_seed(0)) + 1, tmp_path / "h.0.pt")
        inputs = ["--activations", str(tmp_path / "h.0.pt")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "fastsae", "train", *inputs, "--out", str(out), "--batch-tokens", "64",
               "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4", "--log-every", "256",
               "--device", "cpu", "--feature-shards", str(shards)]  # fmt: skip
    for previous, tokens in ((0, 512), (512, 768)):  # a run, then a resumed one
        result = subprocess.run([*command, "--tokens", str(tokens)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        logged = [row for row in _rows(out) if previous < int(row["tokens"]) <= tokens]
        assert result.stdout.count("tokens  h.0: FVU") == len(logged) > 0  # rank 0 prints and logs, once
    assert "resuming from" in result.stdout
    assert [int(row["tokens"]) for row in _rows(out)] == [256, 512, 768]  # every replica's tokens, logged once
    if source == "texts":  # every process evaluated (a shard's forward needs the others); rank 0 wrote
        assert [int(row["tokens"]) for row in _rows(out, "eval.csv")] == [512, 768]
    sae = fastsae.SparseAutoencoder.load(out / "h.0.safetensors")  # the whole SAE
    assert sae.cfg.n_features == 64 and int(sae.n_tokens_seen) == 768
    states = ["state.pt"] if shards == 1 else ["state.shard0.pt", "state.shard1.pt"]
    assert sorted(path.name for path in out.glob("state*.pt")) == states


def test_train_command_on_saved_activations(tmp_path, capsys):
    """--activations: one SAE per file (named by its stem; .safetensors and .npy, [N, d] and
    [batch, seq, d]), over several epochs of the saved tokens, and a resumed run."""
    import numpy as np
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(300, 16, generator=generator) * torch.linspace(0.1, 3, 16) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    np.save(tmp_path / "layer9.npy", (2 * acts).reshape(10, 30, 16).numpy())
    out = tmp_path / "run"
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), str(tmp_path / "layer9.npy"),
              "--out", str(out), "--batch-tokens", "64", "--diagnose-tokens", "128", "--expansion-factor", "4",
              "--k", "4", "--log-every", "256", "--checkpoint-every", "512", "--device", "cpu"]  # fmt: skip
    assert cli([*common, "--tokens", "1024"]) == 0  # 300 tokens saved: about four epochs
    assert "== layer6: diagnose" in capsys.readouterr().out
    rows = _rows(out)
    assert {row["hookpoint"] for row in rows} == {"layer6", "layer9"} and int(rows[-1]["tokens"]) == 1024
    first = fastsae.SparseAutoencoder.load(out / "layer9.safetensors")
    assert cli([*common, "--tokens", "1536"]) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = fastsae.SparseAutoencoder.load(out / "layer9.safetensors")
    assert int(resumed.n_tokens_seen) == 1536 and not torch.equal(resumed.W_dec, first.W_dec)


def test_train_command_keeps_the_optimizer_it_resumes(tmp_path, capsys):
    """SAEAdam by default, torch's Adam with --optimizer adam: each trains, the saved state names it, a
    resumed run keeps it (a state from before the option, which names none, is torch Adam's), and asking
    a run to resume with the other one is refused with an error naming both."""
    from safetensors.torch import save_file

    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--batch-tokens", "64",
              "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4", "--log-every", "256",
              "--checkpoint-every", "256", "--device", "cpu"]  # fmt: skip
    for optimizer, flags in (("saeadam", []), ("adam", ["--optimizer", "adam"])):
        out = tmp_path / optimizer
        assert cli([*common, *flags, "--out", str(out), "--tokens", "512"]) == 0
        state = torch.load(out / "state.pt", weights_only=True)
        assert state["optimizer"] == optimizer
        assert len(state["optimizers"]["layer6"]["param_groups"]) == (2 if optimizer == "saeadam" else 1)
        sae = fastsae.SparseAutoencoder.load(out / "layer6.safetensors")
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.n_features))  # the constraint held
        other = "adam" if optimizer == "saeadam" else "saeadam"
        assert cli([*common, "--optimizer", other, "--out", str(out), "--tokens", "768"]) == 2
        assert f"holds the state of --optimizer {optimizer}; resume with --optimizer {optimizer}" in (
            capsys.readouterr().err
        )
        assert cli([*common, "--out", str(out), "--tokens", "768"]) == 0  # resumed with its own
        assert torch.load(out / "state.pt", weights_only=True)["optimizer"] == optimizer
    old_run = tmp_path / "adam"  # as a run saved before --optimizer existed
    state = torch.load(old_run / "state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, old_run / "state.pt")
    before = fastsae.SparseAutoencoder.load(old_run / "layer6.safetensors")
    assert cli([*common, "--out", str(old_run), "--tokens", "1024"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert torch.load(old_run / "state.pt", weights_only=True)["optimizer"] == "adam"
    assert not torch.equal(fastsae.SparseAutoencoder.load(old_run / "layer6.safetensors").W_dec, before.W_dec)


@pytest.mark.parametrize("optimizer", ["saeadam", "adam"])
def test_train_command_warms_up_and_decays_the_learning_rate(optimizer, tmp_path, monkeypatch, capsys):
    """--lr-warmup-tokens and --lr-decay-tokens: the rate each step trains at rises linearly over the
    first tokens (from the first step's end) and falls linearly to 0 over the last ones (from the
    step's start), held in the optimizer's rate tensor; a resumed run with more --tokens continues from
    its token count, decaying towards its new end."""
    from safetensors.torch import save_file

    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    out = tmp_path / "run"
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--batch-tokens", "64",
              "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4", "--log-every", "256",
              "--checkpoint-every", "256", "--device", "cpu", "--out", str(out), "--optimizer", optimizer,
              "--lr", "1e-2", "--lr-warmup-tokens", "256", "--lr-decay-tokens", "256"]  # fmt: skip
    rates = []
    set_lr = train._set_lr
    monkeypatch.setattr(train, "_set_lr", lambda opt, lr: (rates.append(lr / 1e-2), set_lr(opt, lr)))
    assert cli([*common, "--tokens", "768"]) == 0
    assert "lr 0.01" in capsys.readouterr().out
    assert rates == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25])
    state = torch.load(out / "state.pt", weights_only=True)["optimizers"]["layer6"]
    assert all(float(group["lr"]) == pytest.approx(2.5e-3) for group in state["param_groups"])
    rates.clear()
    assert cli([*common, "--tokens", "1024"]) == 0  # resumed: the last 256 of 1024 decay now
    assert "resuming from" in capsys.readouterr().out
    assert rates == pytest.approx([1, 0.75, 0.5, 0.25])


def test_train_command_trains_a_matryoshka_sae(tmp_path, capsys):
    """--matryoshka-widths: the SAE trains with its prefixes' losses and is saved with its widths (here
    on standardised tokens too, --normalize-activations layer_norm); widths the SAE cannot have are
    refused before anything trains."""
    from safetensors.torch import save_file

    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--batch-tokens", "64",
              "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4", "--tokens", "256",
              "--device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli([*common, "--matryoshka-widths", "8", "32", "--normalize-activations", "layer_norm"]) == 0
    sae = fastsae.SparseAutoencoder.load(tmp_path / "run" / "layer6.safetensors")
    assert sae.cfg.matryoshka_widths == (8, 32) and int(sae.n_tokens_seen) == 256
    assert sae.cfg.normalize_activations == "layer_norm"
    assert cli([*common, "--matryoshka-widths", "8", "64", "--out", str(tmp_path / "other")]) == 2
    assert "matryoshka_widths must increase strictly within [1, n_features=64), got [8, 64]" in capsys.readouterr().err


def test_train_command_trains_alike_at_any_activation_scale(tmp_path, capsys):
    """The same activations, and 64 times larger: SAEAdam's biases step at the activations' scale (its
    bias_lr_scale, printed and kept in the optimizer state), so both runs end with the same W_enc and
    W_dec and biases 64 times apart (to Adam's eps, in fp32). A resumed run keeps the scale it saved, and
    a state from before the option resumes with none (1)."""
    from safetensors.torch import save_file

    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 2, 16) + 2
    saes = {}
    for factor in (1, 64):
        save_file({"acts": acts * factor}, str(tmp_path / "layer6.safetensors"))
        out = tmp_path / f"run{factor}"
        common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--batch-tokens", "64",
                  "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4", "--device", "cpu",
                  "--out", str(out)]  # fmt: skip
        torch.manual_seed(0)
        assert cli([*common, "--tokens", "512"]) == 0
        assert "layer6: the biases' rate x" in capsys.readouterr().out
        saes[factor] = fastsae.SparseAutoencoder.load(out / "layer6.safetensors")
        scales = [
            group["bias_lr_scale"] for group in torch.load(out / "state.pt")["optimizers"]["layer6"]["param_groups"]
        ]
        assert scales[0] == scales[1] and 0.5 * factor < scales[0] < 2 * factor
    for name in ("W_enc", "W_dec"):
        torch.testing.assert_close(getattr(saes[64], name), getattr(saes[1], name), rtol=1e-3, atol=1e-4, msg=name)
    for name in ("b_enc", "b_dec"):
        torch.testing.assert_close(
            getattr(saes[64], name), 64 * getattr(saes[1], name), rtol=1e-3, atol=64e-4, msg=name
        )

    assert cli([*common, "--tokens", "768"]) == 0  # (the last run: 64 x) resumed with its scale
    state = torch.load(out / "state.pt")["optimizers"]["layer6"]
    assert [group["bias_lr_scale"] for group in state["param_groups"]] == scales
    for group in state["param_groups"]:  # as a run saved before the option
        del group["bias_lr_scale"]
    full = torch.load(out / "state.pt")
    full["optimizers"]["layer6"] = state
    torch.save(full, out / "state.pt")
    assert cli([*common, "--tokens", "1024"]) == 0
    state = torch.load(out / "state.pt")["optimizers"]["layer6"]
    assert [group["bias_lr_scale"] for group in state["param_groups"]] == [1.0, 1.0]


def test_learning_rate_schedule_factors():
    """The schedule alone: warm-up by the step's last token, decay by its first, both at once where
    they overlap, none without them, and 0 past the end."""
    args = argparse.Namespace(tokens=1000, lr_warmup_tokens=400, lr_decay_tokens=800)
    assert train._lr_factor(args, 0, 100) == pytest.approx(0.25)
    assert train._lr_factor(args, 300, 400) == pytest.approx(1.0 * 700 / 800)
    assert train._lr_factor(args, 100, 200) == pytest.approx(0.5)  # (the decay starts at token 200)
    assert train._lr_factor(args, 900, 1000) == pytest.approx(100 / 800)
    assert train._lr_factor(args, 1000, 1100) == 0
    plain = argparse.Namespace(tokens=1000, lr_warmup_tokens=0, lr_decay_tokens=0)
    assert not train._scheduled(plain) and train._lr_factor(plain, 0, 64) == 1.0


class _Stop(Exception):
    """A run stopped mid-checkpoint (a kill, a lost node), as the tests below stop one."""


@pytest.mark.parametrize("stop_at", ["before_commit", "after_commit"])
def test_a_checkpoint_stopped_midway_resumes_whole(tmp_path, monkeypatch, capsys, stop_at):
    """A checkpoint is one commit of the SAEs and the optimizer state: a run stopped after writing the
    new SAEs but before the commit record resumes from the checkpoint before, SAEs and state alike (the
    new SAEs had replaced the files beside an older optimizer state and token count), and one stopped
    after the record but before its files were in place resumes from the new checkpoint whole."""
    from safetensors.torch import save_file

    acts = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    out = tmp_path / "run"
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--out", str(out),
              "--batch-tokens", "64", "--diagnose-tokens", "128", "--expansion-factor", "4", "--k", "4",
              "--log-every", "256", "--checkpoint-every", "512", "--device", "cpu"]  # fmt: skip
    assert cli([*common, "--tokens", "1024"]) == 0
    before = fastsae.SparseAutoencoder.load(out / "layer6.safetensors")
    stopped = {"before_commit": "_barrier", "after_commit": "_finish_checkpoint"}[stop_at]
    original, calls = getattr(train, stopped), []

    def stop_in_the_checkpoint(*args):
        calls.append(args)
        if len(calls) == 2:  # the first is the resume's, before training
            raise _Stop
        return original(*args)

    monkeypatch.setattr(train, stopped, stop_in_the_checkpoint)
    with pytest.raises(_Stop):
        cli([*common, "--tokens", "1536"])
    monkeypatch.setattr(train, stopped, original)
    (out / "notes.pending").write_text("a user's file")  # not a checkpoint's: left alone
    assert sorted(p.name for p in out.glob("*.pending")) == [
        "layer6.safetensors.1536.pending", "notes.pending", "state.pt.1536.pending"
    ]  # fmt: skip
    on_disk = fastsae.SparseAutoencoder.load(out / "layer6.safetensors")
    assert torch.equal(on_disk.W_dec, before.W_dec), "the SAE file changed before the checkpoint was committed"
    capsys.readouterr()
    assert cli([*common, "--tokens", "1536"]) == 0
    resumed_at = 1024 if stop_at == "before_commit" else 1536
    assert f"resuming from {out} at {resumed_at} tokens" in capsys.readouterr().out
    assert [p.name for p in out.glob("*.pending")] == ["notes.pending"], "a checkpoint's pending file was left"
    assert torch.load(out / "state.pt", weights_only=True)["tokens"] == 1536
    assert int(fastsae.SparseAutoencoder.load(out / "layer6.safetensors").n_tokens_seen) == 1536
    assert [int(row["tokens"]) for row in _rows(out)] == [256, 512, 768, 1024, 1280, 1536]


def test_train_command_wants_a_model_or_saved_activations(tmp_path, model_dir, capsys):
    saved = tmp_path / "acts.pt"
    torch.save(torch.randn(100, 8), saved)
    for args, message in [
        (["--hookpoint", "h.0", "--texts", "t.txt"], "missing --model"),
        (["--activations", str(saved), "--model", str(model_dir)], "--model belong to a model"),
        (["--activations", str(saved), str(saved)], "distinct names"),
        (["--activations", str(saved)], "fewer than one batch"),
        (["--activations", str(saved), "--eval-texts", "t.txt"], "--eval-texts scores the SAEs in their model"),
    ]:
        assert cli(["train", *args, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [("--tokens", "-5", "must be >= 1, got -5"), ("--tokens", "1e6", "invalid whole_number value"),
     ("--batch-tokens", "1", "must be >= 2"), ("--log-every", "0", "must be >= 1"),
     ("--checkpoint-every", "0", "must be >= 1"), ("--dead-after", "-3", "must be >= 0"),
     ("--k", "0", "must be >= 1"), ("--lr", "-1e-4", "must be > 0"), ("--lr", "nan", "must be > 0")],
)  # fmt: skip
def test_train_command_refuses_counts_out_of_range(option, value, message, tmp_path, capsys):
    """A zero or negative count is a usage error naming its option, before anything loads (it had
    divided by zero, or trained on nothing and reported success)."""
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "--activations", str(tmp_path / "acts.pt"), "--out", str(tmp_path / "o"), f"{option}={value}"])
    assert exit_info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_train_command_checks_the_sae_before_diagnosing(tmp_path, capsys):
    """k beyond the features fails on the config, before the diagnosis of the first tokens."""
    saved = tmp_path / "acts.pt"
    torch.save(torch.randn(256, 8), saved)
    args = ["--activations", str(saved), "--batch-tokens", "64", "--expansion-factor", "2", "--k", "17"]
    assert cli(["train", *args, "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    output = capsys.readouterr()
    assert "k must be in [1, n_features=16], got 17" in output.err and "diagnose on" not in output.out


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_train_command_captures_the_step_on_a_gpu(activation, tmp_path, monkeypatch, capsys):
    """On a GPU a TopK or BatchTopK SAE's steps replay a captured step (after CapturedStep's eager
    warm-up steps); the log follows the eager run's (--no-capture) from the same start, under a
    warm-up and decay of the rate that the replays read from its tensor (no capture again), and either
    run resumes in the other mode (SAEAdam's saved state, its step counts on the host or on the GPU)."""
    from safetensors.torch import save_file

    from fastsae.graphs import CapturedStep

    captures = []
    capture = CapturedStep._capture
    monkeypatch.setattr(CapturedStep, "_capture", lambda self, x: (captures.append(x.shape), capture(self, x)))
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(4096, 64, generator=generator) * torch.linspace(0.1, 3, 64) + 2
    save_file({"acts": acts}, str(tmp_path / "layer6.safetensors"))
    common = ["train", "--activations", str(tmp_path / "layer6.safetensors"), "--batch-tokens", "256",
              "--diagnose-tokens", "512", "--expansion-factor", "8", "--k", "8", "--log-every", "1024",
              "--checkpoint-every", "4096", "--device", "cuda", "--dtype", "float32",
              "--activation", activation, "--lr-warmup-tokens", "1024", "--lr-decay-tokens", "4096"]  # fmt: skip
    runs = {"captured": [], "eager": ["--no-capture"]}
    for mode, flags in runs.items():
        torch.manual_seed(0)  # the same initial SAE
        assert cli([*common, *flags, "--out", str(tmp_path / mode), "--tokens", "8192"]) == 0
    assert captures == [torch.Size([256, 64])]  # the captured run's one capture, none in the eager run
    captured_fvu = [float(row["fvu"]) for row in _rows(tmp_path / "captured")]
    eager_fvu = [float(row["fvu"]) for row in _rows(tmp_path / "eager")]
    assert len(captured_fvu) == len(eager_fvu) == 8 and captured_fvu[-1] < captured_fvu[0]
    torch.testing.assert_close(torch.tensor(captured_fvu), torch.tensor(eager_fvu), rtol=2e-2, atol=1e-3)
    for mode in runs:  # each resumed the other way round
        other = runs["eager" if mode == "captured" else "captured"]
        assert cli([*common, *other, "--out", str(tmp_path / mode), "--tokens", "12288"]) == 0
        assert "resuming from" in capsys.readouterr().out
        sae = fastsae.SparseAutoencoder.load(tmp_path / mode / "layer6.safetensors")
        assert (
            int(sae.n_tokens_seen) == 12288
            and [float(row["fvu"]) for row in _rows(tmp_path / mode)][-1] < captured_fvu[0]
        )
    assert len(captures) == 2  # the eager run's resumption captured
