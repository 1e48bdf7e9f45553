"""Ingredients' tokenizers compared by content: averaging is only meaningful when one text gives the same ids.

Files are compared by what they say, not their bytes: JSON without formatting or key order, text files line by
line, and the vocabulary (token -> id) across formats (`tokenizer.json`, `vocab.json`, `vocab.txt`). Runtime
settings (padding, truncation, maximum length, the class that loads it) may differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .sources import TOKENIZER_FILES, IngredientSource

# Bigger files are compared by their bytes rather than parsed (a real tokenizer.json is at most tens of MB).
MAX_PARSED_BYTES = 256 * 1024 * 1024
# Keys of tokenizer.json / tokenizer_config.json that do not change which ids a text becomes.
RUNTIME_KEYS = {
    "tokenizer.json": frozenset({"version", "truncation", "padding"}),
    "tokenizer_config.json": frozenset(
        {
            "name_or_path",
            "model_max_length",
            "padding_side",
            "truncation_side",
            "tokenizer_file",
            "tokenizer_class",
            "backend",
            "processor_class",
            "clean_up_tokenization_spaces",
            "model_input_names",
            "auto_map",
        }
    ),
}


def _digest(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def canonical_content(name: str, path: Path) -> tuple[str, object | None]:
    """A tokenizer file's content without formatting, and the parsed JSON when it is a JSON file.

    Args:
        name: the file's name in the checkpoint (decides how it is read).
        path: where it is on disk.

    Returns:
        (digest of the canonical content, parsed JSON or None).
    """
    raw = path.read_bytes() if path.stat().st_size <= MAX_PARSED_BYTES else None
    if raw is None:
        with path.open("rb") as f:
            return "bytes:" + hashlib.file_digest(f, "sha256").hexdigest(), None
    try:
        text = raw.decode("utf-8")
        if name.endswith(".json"):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                # An empty or null value is the default, as a missing key is (library versions write either).
                parsed = {
                    k: v
                    for k, v in parsed.items()
                    if k not in RUNTIME_KEYS.get(name, ()) and v not in (None, [], {}, "")
                }
            return _digest(parsed), parsed
    except (UnicodeDecodeError, ValueError, RecursionError):
        return "bytes:" + hashlib.sha256(raw).hexdigest(), None
    if name.endswith((".txt", ".jinja")):
        lines = [line.rstrip("\r") for line in text.split("\n")]
        if name == "merges.txt":
            lines = [line for line in lines if line and not line.startswith("#version")]
        while lines and not lines[-1].strip():
            lines.pop()
        return _digest("\n".join(lines)), None
    return "bytes:" + hashlib.sha256(raw).hexdigest(), None


def _vocabulary(files: dict[str, tuple[str, object | None]], paths: dict[str, Path]) -> dict[str, int] | None:
    """token -> id, from whichever file holds it."""
    parsed = files.get("tokenizer.json", ("", None))[1]
    model = parsed.get("model") if isinstance(parsed, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        return {str(k): v for k, v in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], ids in order
        return {str(entry[0]) if isinstance(entry, list) and entry else str(entry): i for i, entry in enumerate(vocab)}
    vocab = files.get("vocab.json", ("", None))[1]
    if isinstance(vocab, dict):
        return {str(k): v for k, v in vocab.items()}
    if "vocab.txt" in paths:
        lines = paths["vocab.txt"].read_text(encoding="utf-8", errors="replace").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return {line.rstrip("\r"): i for i, line in enumerate(lines)}
    return None


def read_tokenizer(source: IngredientSource) -> tuple[dict[str, str], dict[str, int] | None]:
    """An ingredient's tokenizer files (name -> canonical digest) and its vocabulary (None when it has none)."""
    available = set(source.list_files())
    files: dict[str, tuple[str, object | None]] = {}
    paths: dict[str, Path] = {}
    for name in TOKENIZER_FILES:
        if name in available:
            path = source.fetch(name)
            if path is not None:
                paths[name] = path
                files[name] = canonical_content(name, path)
    return {name: digest for name, (digest, _) in files.items()}, _vocabulary(files, paths)


def _vocabulary_difference(vocab: dict[str, int], ref: dict[str, int], label: str, ref_label: str) -> str:
    for token, index in sorted(ref.items(), key=lambda item: (item[1] if isinstance(item[1], int) else -1, item[0])):
        if vocab.get(token) != index:
            theirs = "absent" if token not in vocab else f"id {vocab[token]}"
            return f"token {token[:40]!r} is id {index} in {ref_label} but {theirs} in {label}"
    extra = sorted(set(vocab) - set(ref))
    return f"{label} has {len(extra)} token(s) {ref_label} lacks, e.g. {extra[0][:40]!r}"


def tokenizer_problems(labels: list[str], sources: list[IngredientSource]) -> list[str]:
    """Sentences naming each way the ingredients' tokenizers differ (empty when they agree).

    Ingredients that ship no tokenizer files are not compared (the output takes the first ingredient's).
    """
    read = [read_tokenizer(s) for s in sources]
    problems: list[str] = []
    with_vocab = [(label, vocab) for label, (_, vocab) in zip(labels, read, strict=True) if vocab is not None]
    for label, vocab in with_vocab[1:]:
        ref_label, ref = with_vocab[0]
        if vocab != ref:
            problems.append("tokenizers differ: " + _vocabulary_difference(vocab, ref, label, ref_label))
    names = sorted({name for files, _ in read for name in files})
    for name in names:
        having = [(label, files[name]) for label, (files, _) in zip(labels, read, strict=True) if name in files]
        ref_label, ref = having[0]
        for label, digest in having[1:]:
            if digest != ref:
                problems.append(f"tokenizer file {name} differs in content between {ref_label} and {label}")
    return problems
