"""Task generators, data splits, task files and the Penn Treebank loader."""

from __future__ import annotations

import pickle
import random
import re
import shutil
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from cellsearch.config import ConfigError
from cellsearch.errors import UserError
from cellsearch.tasks import get_task, task_names, tasks_dir
from cellsearch.tasks import arithmetic, ptb
from cellsearch.tasks import xml as xml_task
from cellsearch.tasks.base import load_task_file
from cellsearch.tasks.synthetic import split_seeds


def _examples(task, split: str, end: str) -> list[tuple[str, str]]:
    """Complete examples of a stream (text, mask flags), cut at ``end`` characters."""
    data = task.splits[split]
    text = task.decode(data.tokens)
    flags = "".join("1" if m else "0" for m in data.mask)
    pieces, start = [], 0
    for match in re.finditer(re.escape(end), text):
        pieces.append((text[start : match.end()], flags[start : match.end()]))
        start = match.end()
    return pieces


def test_the_four_tasks_exist():
    assert set(task_names()) == {"memorize", "arithmetic", "xml", "ptb"}
    with pytest.raises(UserError, match="unknown task 'music'"):
        get_task("music")


def test_memorize_format_and_mask():
    task = get_task("memorize")
    assert task.vocab_size == 28 and task.pass_score == 0.95 and task.metric == "accuracy"
    examples = _examples(task, "valid", ".")
    assert len(examples) > 500
    for text, flags in examples:
        assert re.fullmatch(r"([a-z]{5})=\1\.", text), text
        assert flags == "000000111110"


def test_arithmetic_answers_are_exact_over_thousands_of_examples():
    config = arithmetic.ArithmeticData()
    rng = random.Random(12345)
    operators = set()
    for _ in range(5000):
        text, flags = arithmetic.make_example(config, rng)
        first, operator, second, answer = arithmetic.parse_example(text)
        operators.add(operator)
        assert answer == (first + second if operator == "+" else first - second)
        assert len(str(first)) <= 8 and len(str(second)) <= 8
        question, reply = text.split("=")
        assert re.fullmatch(r"[0-9a-z]+[+-][0-9a-z]+", question), text
        assert all(len(run) <= 3 for run in re.findall(r"[a-z]+", question))
        assert reply == f"{answer}."
        assert flags == "0" * (len(question) + 1) + "1" * len(reply)
    assert operators == {"+", "-"}
    assert len(arithmetic.VOCABULARY) == 40 == len(set(arithmetic.VOCABULARY))


def test_arithmetic_task_stream_holds_exact_examples():
    task = get_task("arithmetic")
    assert task.vocab_size == 40
    examples = _examples(task, "valid", ".")[1:]  # the first piece may be the stream's cut end
    assert len(examples) > 1000
    for text, flags in examples:
        first, operator, second, answer = arithmetic.parse_example(text)
        assert answer == (first + second if operator == "+" else first - second)
        assert flags.endswith("1" * len(f"{answer}."))
        assert flags.count("1") == len(f"{answer}.")


def test_xml_documents_are_well_formed_and_follow_the_rules():
    config = xml_task.XmlData()
    rng = random.Random(7)
    sizes = []
    for _ in range(2000):
        text, flags = xml_task.make_document(config, rng)
        assert text.endswith("\n") and set(flags) == {"1"}
        root = ElementTree.fromstring(text)
        tags = re.findall(r"<(/?)([a-z]+)>", text)
        assert all(2 <= len(name) <= 10 for _, name in tags)
        opened = sum(1 for slash, _ in tags if not slash)
        assert opened <= config.max_steps, "no tag may open once 50 steps have passed"
        sizes.append(len(list(root.iter())))
    assert max(sizes) > 10 and min(sizes) == 1


def test_xml_task_stream_is_a_sequence_of_documents():
    task = get_task("xml")
    assert task.vocab_size == 30
    documents = task.decode(task.splits["valid"].tokens).split("\n")[:-1]
    assert len(documents) > 200
    for document in documents:
        ElementTree.fromstring(document)
    assert task.splits["valid"].mask.all()


def test_generated_splits_use_distinct_seeds_and_are_reproducible():
    seeds = split_seeds(20150703)
    assert len(set(seeds.values())) == 3
    assert split_seeds(20150703) == seeds
    task = get_task("xml")
    train, valid = task.splits["train"].tokens, task.splits["valid"].tokens
    assert not np.array_equal(train[: len(valid)], valid)
    definition = load_task_file(tasks_dir() / "xml.yaml")
    again = xml_task.build(definition)
    assert np.array_equal(again.splits["valid"].tokens, valid)


def test_tasks_pickle_with_their_arrays():
    task = get_task("memorize")
    copy = pickle.loads(pickle.dumps(task))
    assert np.array_equal(copy.splits["train"].tokens, task.splits["train"].tokens)
    assert copy.budget("smoke") == task.budget("smoke")
    assert copy.space_for("small") == task.space_for("small")
    assert not task.splits["train"].tokens.flags.writeable


def test_profiles_narrow_the_space_and_change_the_defaults():
    task = get_task("arithmetic")
    assert task.profiles == ("smoke", "small", "medium", "paper")
    assert task.space.learning_rate == (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
    smoke = task.space_for("smoke")
    assert smoke.num_layers == (1,) and smoke.learning_rate == task.space.learning_rate
    assert task.default_hparams("smoke") in smoke
    assert task.budget("smoke").max_epochs * task.budget("smoke").steps_per_epoch <= 20
    with pytest.raises(ConfigError, match="unknown profile"):
        task.budget("huge")


def test_task_file_errors_name_the_key(tmp_path):
    text = (tasks_dir() / "memorize.yaml").read_text()
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text(text.replace("alphabet: 26", "alphabet: 26\n  colour: red"))
    with pytest.raises(ConfigError, match="data.colour"):
        get_task(str(bad_key))
    bad_profile = tmp_path / "bad2.yaml"
    bad_profile.write_text(text.replace("  smoke:\n    budget: {", "  smoke:\n    budget: {max_steps: -1, "))
    with pytest.raises(ConfigError, match="max_steps"):
        get_task(str(bad_profile))
    bad_space = tmp_path / "bad3.yaml"
    bad_space.write_text(text.replace("num_layers: [1], parameter_budget: [3000]", "num_layers: [0]"))
    with pytest.raises(ConfigError, match="num_layers"):
        get_task(str(bad_space))


def test_ptb_loads_the_mikolov_split(ptb_dir):
    task = get_task("ptb", data_dir=ptb_dir)
    assert task.vocab_size == 10_000
    assert {name: len(split) for name, split in task.splits.items()} == {
        "train": 929_589, "valid": 73_760, "test": 82_430}
    assert "<eos>" in task.vocabulary and "<unk>" in task.vocabulary
    first_line = (ptb_dir / "ptb.valid.txt").read_text().splitlines()[0].split()
    assert task.decode(task.splits["valid"].tokens[: len(first_line) + 1]) == " ".join(first_line + ["<eos>"])
    assert task.metric == "inverse_perplexity" and task.splits["train"].mask is None
    assert task.score(np.log(100.0), 0.0) == pytest.approx(0.01)


def test_ptb_sums_are_the_published_ones(ptb_dir):
    published = dict(reversed(line.split()) for line in (ptb_dir / "SHA256SUMS").read_text().splitlines())
    assert published == ptb.SHA256


def test_ptb_corrupt_or_missing_files_give_a_clear_error(ptb_dir, tmp_path, monkeypatch):
    for name in ptb.FILES.values():
        shutil.copy(ptb_dir / name, tmp_path / name)
    with open(tmp_path / "ptb.valid.txt", "a") as handle:
        handle.write(" extra words \n")
    with pytest.raises(UserError, match=r"ptb.valid.txt has SHA-256 .* expected c9fe6985"):
        get_task("ptb", data_dir=tmp_path)
    (tmp_path / "ptb.test.txt").unlink()
    with pytest.raises(UserError, match=r"ptb.test.txt not found .*simple-examples.*CELLSEARCH_PTB_DIR"):
        get_task("ptb", data_dir=tmp_path)
    monkeypatch.delenv("CELLSEARCH_PTB_DIR", raising=False)
    with pytest.raises(UserError, match="no Penn Treebank directory given"):
        get_task("ptb")
    monkeypatch.setenv("CELLSEARCH_PTB_DIR", str(ptb_dir))
    assert ptb.find_data_dir() == ptb_dir
