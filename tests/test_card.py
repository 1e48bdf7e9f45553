"""The generated model card: front matter that huggingface_hub parses back, body, evaluation, license lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from warm_hub.card import MAX_CARD_BYTES, TAGS, EvalResults, hub_url, read_front_matter, write_card
from warm_hub.errors import InvalidOptionError
from warm_hub.recipe import Ingredient, WarmRecipe

SHA_A = "a" * 40
SHA_B = "b" * 40
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


def save_recipe(folder: Path, ingredients: list[Ingredient]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    WarmRecipe(
        ingredients=ingredients,
        dtype="bfloat16",
        shards={"model.safetensors": "c" * 64},
        total_size=1234,
        tool_version="0.1.0",
    ).save(folder)
    return folder


def eval_file(folder: Path, *, plot: bool = True, **overrides) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "dataset": {"name": "HH-RLHF (harmless)", "type": "Anthropic/hh-rlhf"},
        "splits": {
            "test": {"WARM": {"accuracy": 0.712, "n": 500}, "member-0": {"accuracy": 0.69, "n": 500}},
            "ood": {"WARM": {"accuracy": 0.655, "n": 300}, "ensemble": {"accuracy": 0.65, "n": 300}},
        },
        **overrides,
    }
    if plot:
        (folder / "accuracy.png").write_bytes(PNG)
        data["plot"] = "accuracy.png"
    path = folder / "results.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A merge output's recipe with two Hub ingredients and one local folder."""
    return save_recipe(
        tmp_path / "warm",
        [
            Ingredient(source="org/a", weight=0.5, revision=SHA_A),
            Ingredient(source="org/b", weight=0.3, revision=SHA_B),
            Ingredient(source="member-2", weight=0.2, local=True),
        ],
    )


def test_front_matter_parses_back_with_huggingface_hub(mixed, tmp_path):
    from huggingface_hub import ModelCard

    path = write_card(
        mixed,
        repo_id="alice/warm-rm",
        license="apache-2.0",
        datasets=["Anthropic/hh-rlhf"],
        eval_results=eval_file(tmp_path / "eval"),
    )
    card = ModelCard.load(path)
    data = card.data.to_dict()

    assert data["base_model"] == ["org/a", "org/b"]  # the local folder is not claimed as a Hub model
    assert data["base_model_relation"] == "merge"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert data["tags"] == TAGS
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["Anthropic/hh-rlhf"]
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("test", "accuracy"): 0.712, ("ood", "accuracy"): 0.655}
    assert {r.dataset_type for r in card.data.eval_results} == {"Anthropic/hh-rlhf"}
    assert card.data.model_name == "warm-rm"

    text = card.text
    assert f"[`{SHA_A[:12]}`]({hub_url()}/org/a/tree/{SHA_A})" in text
    assert "| 3 | local folder `member-2` (not published) | n/a | 0.2000 |" in text
    assert 'model_id = "alice/warm-rm"' in text and "logits[0, 0]" in text
    assert f"warm-hub merge org/a@{SHA_A} org/b@{SHA_B} ./member-2 --weights 0.5,0.3,0.2 --dtype bfloat16" in text
    assert "| **WARM** | 0.712 (n=500) | 0.655 (n=300) |\n" in text
    assert "| ensemble | – | 0.650 (n=300) |\n" in text
    assert "![Pairwise accuracy](accuracy.png)" in text
    assert f"revision: {SHA_A}" in text  # the recipe YAML
    assert "arXiv:2401.12187" in text
    assert str(tmp_path) not in path.read_text()  # never a local absolute path


def test_card_without_hub_ingredients_or_evaluation(tmp_path):
    from huggingface_hub import ModelCard

    folder = save_recipe(
        tmp_path / "local-warm", [Ingredient("m0", 0.5, local=True), Ingredient("m1", 0.5, local=True)]
    )
    card = ModelCard.load(write_card(folder))
    data = card.data.to_dict()
    assert "base_model" not in data and "license" not in data and "model-index" not in data
    assert data["base_model_relation"] == "merge"
    assert "## Evaluation" not in card.text
    assert "# local-warm" in card.text and 'model_id = "<your-org>/local-warm"' in card.text


def test_license_and_datasets_come_from_the_ingredients_cards(hub_server, tmp_path):
    from huggingface_hub import ModelCard

    def card(license: str, dataset: str) -> bytes:
        return f"---\nlicense: {license}\ndatasets:\n- {dataset}\n---\n# member\n".encode()

    sha_a = hub_server.upload("org/a", {"README.md": card("apache-2.0", "org/prefs-1")})
    sha_b = hub_server.upload("org/b", {"README.md": card("apache-2.0", "org/prefs-2")})
    sha_c = hub_server.upload("org/c", {"README.md": card("mit", "org/prefs-1")})
    hub_server.upload("org/a", {"README.md": card("mit", "org/other")})  # later commits are not what was merged

    agree = save_recipe(tmp_path / "agree", [Ingredient("org/a", 0.5, sha_a), Ingredient("org/b", 0.5, sha_b)])
    data = ModelCard.load(write_card(agree)).data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["org/prefs-1", "org/prefs-2"]

    differ = save_recipe(tmp_path / "differ", [Ingredient("org/a", 0.5, sha_a), Ingredient("org/c", 0.5, sha_c)])
    assert "license" not in ModelCard.load(write_card(differ)).data.to_dict()

    local = save_recipe(tmp_path / "local", [Ingredient("org/a", 0.5, sha_a), Ingredient("m", 0.5, local=True)])
    assert "license" not in ModelCard.load(write_card(local)).data.to_dict()  # unknown for the local folder


def test_card_command_adopts_eval_results_and_later_refreshes_keep_them(mixed, tmp_path, run_cli):
    from huggingface_hub import ModelCard

    code, out, err = run_cli("card", mixed, "--eval-results", eval_file(tmp_path / "elsewhere"))
    assert code == 0, err
    assert (mixed / "eval_results.json").is_file() and (mixed / "accuracy.png").read_bytes() == PNG
    assert json.loads((mixed / "eval_results.json").read_text())["plot"] == "accuracy.png"

    write_card(mixed, repo_id="alice/warm-rm")  # e.g. when pushing: no --eval-results given
    card = ModelCard.load(mixed / "README.md")
    assert "![Pairwise accuracy](accuracy.png)" in card.text and "| **WARM** | 0.712 (n=500)" in card.text
    assert len(card.data.eval_results) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"splits": {}}, '"splits" must map'),
        ({"splits": {"test": {"WARM": {"accuracy": 1.5}}}}, "accuracy 1.5 is not a fraction"),
        ({"splits": {"test": {"WARM": {"accuracy": "high"}}}}, '"accuracy" must be a number'),
        ({"splits": {"test": {"WARM": {"accuracy": 0.7, "n": -3}}}}, '"n" must be a count'),
        ({"splits": {"test": {"WARM": {"accuracy": 0.7, "n": 9, "ci": [0.9, 0.8]}}}}, '"ci" must be'),
        ({"splits": {"test": {"WARM": {"accuracy": 0.5, "ci": [0.1, 5.0]}}}}, '"ci" must be'),
        ({"splits": {"test": {"WARM": {"accuracy": 0.7}}}, "seeds": {"splits": {"test": {"WARM": {}}}}}, "seeds/test"),
        ({"splits": {"test": {"WARM": {"accuracy": 0.7}}}, "seeds": {"splits": {"test": [0.7]}}}, "seeds/test"),
        ({"splits": {"test": {"WARM": {"accuracy": 0.7, "ci": "wide"}}}}, '"ci" must be'),
    ],
)
def test_malformed_eval_results_are_one_clear_line(mixed, tmp_path, run_cli, change, message):
    path = eval_file(tmp_path / "bad", plot=False, **change)
    with pytest.raises(InvalidOptionError, match=message):
        EvalResults.load(path)
    code, out, err = run_cli("card", mixed, "--eval-results", path)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"Error: {path}: ") and message in err


def test_which_entry_is_the_merged_model():
    splits = {"test": {"member-0": {"accuracy": 0.6}, "warm-rm": {"accuracy": 0.7}}}
    assert EvalResults.from_dict({"splits": splits}).this_model("warm-rm") == "warm-rm"
    assert EvalResults.from_dict({"splits": splits, "model": "member-0"}).this_model("x") == "member-0"
    unknown = EvalResults.from_dict({"splits": splits, "dataset": {"type": "org/prefs"}})
    assert unknown.this_model("other") is None
    assert unknown.model_index("other") == []  # no model-index without knowing which row is this model
    no_dataset = EvalResults.from_dict({"splits": {"test": {"WARM": 0.7}}})
    assert no_dataset.this_model(None) == "WARM" and no_dataset.model_index(None) == []


def test_accepts_the_document_warm_hub_evaluate_writes(mixed, tmp_path):
    from huggingface_hub import ModelCard

    from warm_hub.evaluate import EVAL_RESULTS_SCHEMA  # noqa: F401 - the producer of this schema

    document = {
        "format": "warm-hub-eval",
        "version": 1,
        "metric": "pairwise_accuracy",
        "dataset": {"name": "org/prefs", "type": "org/prefs"},
        "splits": {"test": {"member-0": {"accuracy": 0.6, "n": 40}, "warm (3)": {"accuracy": 0.7, "n": 40}}},
        "models": [{"name": "member-0", "kind": "member", "source": "m0"}, {"name": "warm (3)", "kind": "warm"}],
        "data": [{"split": "test", "source": "org/prefs", "pairs": 40}],
        "interpolation": None,
        "greedy": None,
    }
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps(document))
    card = ModelCard.load(write_card(mixed, eval_results=path))
    assert [(r.dataset_type, r.dataset_split, r.metric_value) for r in card.data.eval_results] == [
        ("org/prefs", "test", 0.7)
    ]
    assert "| **warm (3)** | 0.700 (n=40) |" in card.text


@pytest.mark.parametrize(
    "raw",
    [
        b"no front matter at all\n",
        b"---\nlicense: [unclosed\n---\nbody\n",
        b"---\n- a list, not a mapping\n---\n",
        b"---\n!!python/object/apply:os.system ['echo pwned']\n---\n",
        b"---\nlicense: mit\nno closing line\n",
        b"---\nlicense: mit\n---\n\xff\xfe not utf-8",
    ],
)
def test_unreadable_previous_card_is_replaced_not_trusted(mixed, raw):
    (mixed / "README.md").write_bytes(raw)
    path = write_card(mixed)
    assert read_front_matter(path)["base_model_relation"] == "merge"
    assert "license" not in read_front_matter(path)


def test_previous_card_license_survives_a_refresh(mixed):
    (mixed / "README.md").write_text("---\r\nlicense: mit\r\ndatasets: org/prefs\r\n---\r\nold body\r\n")
    data = read_front_matter(write_card(mixed))
    assert data["license"] == "mit" and data["datasets"] == ["org/prefs"]


def test_oversized_card_is_not_read(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nlicense: mit\n---\n" + "x" * (MAX_CARD_BYTES + 1))
    assert read_front_matter(path) == {}


@pytest.mark.parametrize("endpoint", ["https://huggingface.co", "https://hub.example.com/"])
def test_card_links_to_the_configured_hub(mixed, monkeypatch, endpoint):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    text = write_card(mixed, repo_id="alice/warm-rm").read_text(encoding="utf-8")
    base = endpoint.rstrip("/")
    assert f"[org/a]({base}/org/a)" in text and f"({base}/org/b/tree/{SHA_B})" in text
    other = "https://hub.example.com" if base == "https://huggingface.co" else "https://huggingface.co"
    assert other not in text
    assert (f"set `HF_ENDPOINT={base}`" in text) == (base != "https://huggingface.co")
