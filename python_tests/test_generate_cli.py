"""``python -m aspd_kernels.generate`` on a tiny random model saved with save_pretrained and a word-level tokenizer
built offline."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_decoder_helpers import VOCAB, tiny_model, transformers

from aspd_kernels.tokens import TOKEN_STRINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny")
    vocab = {"[UNK]": 0, "<eos>": 1}
    vocab.update({f"w{i}": i for i in range(2, 290)})
    vocab.update({t: 290 + i for i, t in enumerate(TOKEN_STRINGS)})
    vocab.update({"####": 296, "%%%%": 297, ":": 298, "......": 299})  # Yu's plan format, word by word
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>",
                                                additional_special_tokens=list(TOKEN_STRINGS))
    fast.save_pretrained(path)
    # llama: transformers 5 maps a qwen2 config to its own Qwen2Tokenizer, which ignores a word-level tokenizer.json
    model = tiny_model("llama", seed=4, vocab_size=VOCAB)
    model.save_pretrained(path)
    return path, model


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "aspd_kernels.generate", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)


def test_cli_branches(model_dir):
    path, model = model_dir
    out = _cli("--model", str(path), "--prompt", "w5 w17 w33", "--branches", "w7 w8", "w9", "w10 w11 w12",
               "--max-new-tokens", "4", "--suffix", "w3 w4", "--suffix-tokens", "2", "--device", "cpu",
               "--dtype", "float32")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "== parallel section 0 (3 branches)" in text
    for j in (1, 2, 3):
        assert f"[branch {j}]" in text
    # forward passes: prefix + branch prefill + longest branch (4) + one suffix step
    line = next(ln for ln in text.splitlines() if ln.startswith("forward passes"))
    assert int(line.split()[-1]) == 7
    assert "tokens/s" in text and "time" in text
    assert "decoding" in out.stderr  # the progress bar
    # the printed branches are the model's greedy continuations of prefix + branch prompt alone
    first = next(ln for ln in text.splitlines() if ln.startswith("[branch 1]"))
    ids = [5, 17, 33, 7, 8]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=1,
                             pad_token_id=0)[0, len(ids):].tolist()
    words = " ".join("<eos>" if t == 1 else (TOKEN_STRINGS[t - 290] if t >= 290 else f"w{t}") for t in gen)
    assert first.endswith(repr(words))


def test_cli_aspd_mode_and_errors(model_dir, capsys):
    """In-process (the subprocess above already covers ``-m``): model-driven mode, sampled, and a usage error."""
    from aspd_kernels.generate import main

    path, _ = model_dir
    assert main(["--model", str(path), "--prompt", "w5 w6", "--aspd", "--max-new-tokens", "6", "--device", "cpu",
                 "--no-progress", "--temperature", "0.8", "--top-k", "50", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "== after the section:" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("tokens generated"))
    assert int(line.split()[2]) == 6  # no title in a random model's output: six serial tokens
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--prompt", "w5"])
    assert "--branches" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(path), "--prompt", "w5", "--aspd", "--plan"])
    assert "--plan" in capsys.readouterr().err


def test_cli_plan_mode(model_dir):
    """--plan on the saved model: '####' starts the answer's list, the grammar bounds the titles and the items, the
    items are decoded as branches and the conclusion follows, as generate_plan decodes them."""
    from aspd_kernels.decoder import YU_INSTRUCTION, ParallelDecoder, PlanFormat

    path, model = model_dir
    out = _cli("--model", str(path), "--prompt", "w5 w17 w33", "--plan", "--plan-prefix", " ####",
               "--max-items", "3", "--max-title-tokens", "2", "--max-plan-tokens", "40", "--max-branch-tokens",
               "4", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32", "--no-progress")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    fmt = PlanFormat.yu(tok, max_items=3, max_title_tokens=2)
    assert fmt.item_open == (296,) and fmt.plan_end == (297,) and fmt.title_end == (298,)
    assert fmt.placeholder == (299,) and fmt.conclusion == (296, 297) and fmt.branch_stop == (296,)
    ids = tok.encode(f"w5 w17 w33\n{YU_INSTRUCTION} ####", add_special_tokens=False)
    want = ParallelDecoder.from_hf(model, max_seq_len=512).generate_plan(ids, fmt, 40, 4, 3, eos_token_id=1)
    assert want.branches, "the grammar should have closed the plan within 40 tokens"
    assert lines[0] == f"== plan: {tok.decode(want.plan, skip_special_tokens=False)!r}"
    assert f"== parallel section 0 ({len(want.branches[0])} branches)" in lines
    for j, b in enumerate(want.branches[0], start=1):
        assert f"[branch {j}] {tok.decode(b, skip_special_tokens=False)!r}" in lines
    assert f"== after the section: {tok.decode(want.suffix, skip_special_tokens=False)!r}" in lines


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); a usage error's SystemExit gives its code."""
    from aspd_kernels.generate import main

    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    """Bad input: one line on stderr naming what is wrong, exit status 2, no traceback."""
    path, _ = model_dir
    monkeypatch.setenv("ASPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ASPD_DEBUG", raising=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    cases = [
        (["--model", str(tmp_path / "nope"), "--prompt", "w5", "--branches", "w7"], "is not a model directory"),
        (["--model", str(tmp_path / "empty"), "--prompt", "w5", "--branches", "w7"], "has no config.json"),
        (["--model", str(tmp_path / "bad.gguf"), "--prompt", "w5", "--branches", "w7"], "GGUF"),
        (["--model", str(path), "--prompt", "w5", "--branches", "w7", "--suffix-tokens", "2"],
         "--suffix-tokens needs --suffix"),
        (["--model", str(path), "--prompt", "w5", "--branches", "w7", "--max-new-tokens", "0"], "must be >= 1"),
        (["--model", str(path), "--prompt", "w5", "--plan", "--stop", "x"], "--stop is for --branches"),
        (["--model", str(path), "--prompt", "w5", "--branches", "w7", "--max-seq-len", "8", "--device", "cpu",
          "--no-progress"], "more than max_seq_len=8"),
        (["--model", str(path), "--prompt", "w5", "--branches", "w7", "--chat", "--device", "cpu"],
         "has no chat template"),
    ]
    for argv, want in cases:
        rc, out, err = _main(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 2, (argv, rc, err)
        assert len(lines) == 1 and want in lines[0] and "Traceback" not in err, (argv, err)
        assert lines[0].startswith(("error: ", "python -m aspd_kernels.generate: error: ")), lines[0]
        assert out == "", (argv, out)


def test_cli_wrong_model_exit_status_from_the_shell(tmp_path):
    out = _cli("--model", str(tmp_path / "nope"), "--prompt", "x", "--branches", "y")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: model: {str(tmp_path / 'nope')!r} is not a model directory, a .gguf file, or 'smollm2'")


def test_cli_branches_stop_and_distinct_starts(model_dir, capsys):
    """--stop ends a branch at the first token whose text holds it (kept), the others go on; --distinct-starts
    (default) keeps branch 1 as decoded alone and gives no two branches the same first token."""
    path, model = model_dir
    base = ["--model", str(path), "--prompt", "w5 w17 w33", "--branches", "w7", "w7", "w7", "--max-new-tokens",
            "5", "--device", "cpu", "--no-progress"]

    def branches(out: str) -> list[list[str]]:
        rows = [ln for ln in out.splitlines() if ln.startswith("[branch ")]
        return [eval(ln.split(" -> ", 1)[1]).split() for ln in rows]  # noqa: S307 - our own repr

    rc, out, _ = _main(capsys, *base, "--no-distinct-starts", "--stop")
    assert rc == 0
    alone = branches(out)
    assert alone[0] == alone[1] == alone[2] and len(alone[0]) == 5  # the same prompt: the same text
    rc, out, _ = _main(capsys, *base, "--stop")
    firsts = [b[0] for b in branches(out)]
    assert branches(out)[0] == alone[0] and len(set(firsts)) == 3
    word = alone[0][2]
    rc, out, _ = _main(capsys, *base, "--no-distinct-starts", "--stop", word)
    k = alone[0].index(word)
    assert rc == 0 and all(b == alone[0][:k + 1] for b in branches(out))
    assert "stopped           a stop rule ended the branches" in out
    lines = out.splitlines()
    answer = lines[lines.index("== answer:") + 1:lines.index("== answer:") + 4]
    text = " ".join(w for w in alone[0][:k + 1] if w not in TOKEN_STRINGS)  # special tokens are not shown there
    assert answer == [f"w7{text}"] * 3  # each branch prompt, then its text


def test_cli_plan_not_found_is_said_once(model_dir, capsys):
    """A model that writes no plan: the CLI says the answer is serial, and prints its text once."""
    path, _ = model_dir
    rc, out, _ = _main(capsys, "--model", str(path), "--prompt", "w5 w17", "--plan", "--max-plan-tokens", "4",
                       "--max-new-tokens", "2", "--device", "cpu", "--no-progress")
    assert rc == 0
    assert out.splitlines()[0].startswith("== no plan: the model wrote no complete plan within --max-plan-tokens")
    assert "so the answer is serial" in out and "after the section" not in out and "== parallel section" not in out
    assert sum(ln.startswith("== answer:") for ln in out.splitlines()) == 1
    assert "stopped           a token limit was reached" in out
