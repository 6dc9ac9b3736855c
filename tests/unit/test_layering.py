"""Import rules that keep one home per concern (read from the source, no imports executed)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_vcap"


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (lazy imports inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules(exclude: tuple[str, ...] = ()):
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith(exclude):
            yield rel, _imports(path)


def test_production_code_does_not_import_the_test_kit():
    bad = [rel for rel, names in _modules(("testing/",))
           if any(n.startswith("megatron_vcap.testing") for n in names)]  # fmt: skip
    assert not bad, bad


def test_parallel_state_is_read_only_in_parallel_models_and_the_test_kit():
    # Everything else asks the ParallelContext (parallel/runtime.py) for ranks and groups; the
    # test kit (testing/) may set Megatron's groups up itself.
    bad = [rel for rel, names in _modules(("parallel/", "models/", "testing/"))
           if any("parallel_state" in n for n in names)]  # fmt: skip
    assert not bad, bad


def test_special_tokens_have_one_home_and_synth_tokenizer_import_one_way():
    imports = dict(_modules())
    assert "megatron_vcap.data.synth" not in imports["data/tiny_tokenizer.py"]
    assert "megatron_vcap.data.tiny_tokenizer" in imports["data/synth.py"]
    for path in PACKAGE.rglob("*.py"):
        if path.name != "tokens.py":
            assert '"<|object_ref_start|>"' not in path.read_text(), path  # a second list


def test_char_and_bpe_tokenizers_carry_the_one_list(tmp_path):
    from transformers import AutoTokenizer

    from megatron_vcap.data.synth import tokenizer_corpus
    from megatron_vcap.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_vcap.data.tokens import SPECIAL_TOKENS, special_token_ids
    from megatron_vcap.models.presets import build_char_tokenizer, tiny_hf_config

    char = build_char_tokenizer(128)
    ids = special_token_ids(char)
    assert list(ids) == list(SPECIAL_TOKENS)
    cfg = tiny_hf_config("qwen2_5_vl", 128)
    assert (cfg.video_token_id, cfg.image_token_id) == (ids["<|video_pad|>"], ids["<|image_pad|>"])
    bpe = AutoTokenizer.from_pretrained(
        str(build_tiny_tokenizer(tmp_path, tokenizer_corpus(num_scenes=20), vocab_size=400))
    )
    assert list(special_token_ids(bpe)) == list(SPECIAL_TOKENS)
