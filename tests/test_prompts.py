"""Prompt sources: templates, wildcards, literal braces, .txt, .csv, .tsv, .jsonl, PartiPrompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchgen.errors import ManifestError
from batchgen.manifest import PromptFile, load_manifest
from batchgen.prompts import Prompt, TemplateError, TemplateExpander, load_prompts, read_prompt_file

NANO = "google/nano-banana/pro/text-to-image"


def manifest_with(tmp_path: Path, prompts_yaml: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(f"name: p\nsweeps:\n  - model: {NANO}\n    prompts:\n{prompts_yaml}", "utf-8")
    return path


def prompts_of(tmp_path: Path, prompts_yaml: str) -> tuple[list[Prompt], list[str]]:
    return load_prompts(load_manifest(manifest_with(tmp_path, prompts_yaml)), 0)


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a {red|blue} ball", ["a red ball", "a blue ball"]),
        ("{a|b} {c|d}", ["a c", "a d", "b c", "b d"]),
        ("{a|{b|c}}", ["a", "b", "c"]),
        ("{2$$x|y}", ["x,y", "y,x"]),
        ("{50% off|$5 #1}", ["50% off", "$5 #1"]),
        ('json {"k": "v"} and {x|y}', ['json {"k": "v"} and x', 'json {"k": "v"} and y']),
    ],
)
def test_templates_expand_combinatorially(text: str, expected: list[str]) -> None:
    assert TemplateExpander(None).expand(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        '{"subject": "cat", "style": "ink"}',
        "photo #1 of a cat",
        "100% cotton, $5",
        "an unclosed { brace",
        "a closing } brace",
        "empty {} braces",
        "snake_case and double__underscore",
        "emoji 🎨 and RTL שלום",
    ],
)
def test_text_that_is_not_template_syntax_survives_as_written(text: str) -> None:
    assert TemplateExpander(None).expand(text) == [text]


def test_wildcards_come_from_the_wildcards_folder(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "style.txt").write_text("ink\n# a comment\n\noil\n", "utf-8")
    prompts, _ = prompts_of(tmp_path, '      - "a fox, __style__"\n')
    assert sorted(p.text for p in prompts) == ["a fox, ink", "a fox, oil"]


def test_an_unknown_wildcard_is_an_error_with_a_suggestion(tmp_path: Path) -> None:
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "style.txt").write_text("ink\n", "utf-8")
    with pytest.raises(ManifestError) as info:
        prompts_of(tmp_path, '      - "a fox, __stlye__"\n')
    issue = info.value.issues[0]
    assert issue.key == "sweeps[0].prompts[0]" and issue.line == 5
    assert "did you mean 'style'" in issue.message
    with pytest.raises(TemplateError):
        TemplateExpander(None).expand("__nothing__ here")


def test_template_false_sends_text_as_written(tmp_path: Path) -> None:
    prompts, _ = prompts_of(
        tmp_path, '      - {text: "a {red|blue} fox, __x__", template: false}\n'
    )
    assert [p.text for p in prompts] == ["a {red|blue} fox, __x__"]


def test_inline_prompts_carry_their_manifest_line(tmp_path: Path) -> None:
    prompts, _ = prompts_of(tmp_path, '      - "a {red|blue} fox"\n      - "an owl"\n')
    assert [(p.text, p.source) for p in prompts] == [
        ("a red fox", "m.yaml:5"),
        ("a blue fox", "m.yaml:5"),
        ("an owl", "m.yaml:6"),
    ]
    assert prompts[0].metadata == {"prompt_source": "m.yaml:5"}


def test_the_cap_stops_a_runaway_template() -> None:
    text = " ".join("{a|b}" for _ in range(30))  # 2**30 prompts
    assert len(TemplateExpander(None).expand(text, cap=11)) == 11


# --------------------------------------------------------------------------- files


def test_txt_one_prompt_per_line(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(
        "# header comment\na fox\n\n   \n  # indented comment\nan owl, {day|night}\n", "utf-8"
    )
    prompts, _ = prompts_of(tmp_path, "      - file: p.txt\n")
    assert [(p.text, p.source) for p in prompts] == [
        ("a fox", "p.txt:2"),
        ("an owl, day", "p.txt:6"),
        ("an owl, night", "p.txt:6"),
    ]


def test_csv_with_quotes_commas_and_newlines(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text(
        'prompt,kind\n"a ""quoted"" fox, running",animal\n"two\nlines",odd\n,empty\n', "utf-8"
    )
    prompts, _ = prompts_of(tmp_path, "      - file: p.csv\n")
    assert [p.text for p in prompts] == ['a "quoted" fox, running', "two\nlines"]
    assert prompts[0].metadata == {"kind": "animal", "prompt_source": "p.csv:2"}
    assert prompts[1].source == "p.csv:3"


def test_tsv_where_equality_and_lists_limit_and_metadata(tmp_path: Path) -> None:
    rows = ["Prompt\tCategory\tChallenge"] + [
        f"prompt {i}\t{'Animals' if i % 2 else 'Food'}\t{'Basic' if i % 3 else 'Hard'}"
        for i in range(12)
    ]
    (tmp_path / "p.tsv").write_text("\n".join(rows) + "\n", "utf-8")
    spec = (
        "      - file: p.tsv\n        column: Prompt\n"
        "        where: {Category: Animals, Challenge: [Basic, Hard]}\n        limit: 4\n"
    )
    prompts, _ = prompts_of(tmp_path, spec)
    assert [p.text for p in prompts] == ["prompt 1", "prompt 3", "prompt 5", "prompt 7"]
    assert prompts[1].metadata == {
        "Category": "Animals",
        "Challenge": "Hard",
        "prompt_source": "p.tsv:5",
    }


def test_sample_is_reproducible_and_kept_in_file_order(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("\n".join(f"line {i}" for i in range(100)), "utf-8")
    one = read_prompt_file(PromptFile(file=tmp_path / "p.txt", sample={"n": 10, "seed": 3}))
    two = read_prompt_file(PromptFile(file=tmp_path / "p.txt", sample={"n": 10, "seed": 3}))
    other = read_prompt_file(PromptFile(file=tmp_path / "p.txt", sample={"n": 10, "seed": 4}))
    assert one == two and len(one) == 10
    assert [p.text for p in one] != [p.text for p in other]
    numbers = [int(p.text.split()[1]) for p in one]
    assert numbers == sorted(numbers)
    everything = read_prompt_file(PromptFile(file=tmp_path / "p.txt", sample={"n": 500, "seed": 3}))
    assert len(everything) == 100


def test_jsonl_keeps_typed_metadata(tmp_path: Path) -> None:
    lines = [
        {"text": "a fox", "score": 3, "tags": ["a"]},
        {"text": "an owl", "score": 5, "tags": []},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", "utf-8")
    prompts, _ = prompts_of(
        tmp_path, "      - file: p.jsonl\n        column: text\n        where: {score: 5}\n"
    )
    assert [(p.text, p.metadata) for p in prompts] == [
        ("an owl", {"score": 5, "tags": [], "prompt_source": "p.jsonl:2"})
    ]


def test_bad_jsonl_line_is_located(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{not json\n', "utf-8")
    with pytest.raises(ManifestError) as info:
        prompts_of(tmp_path, "      - file: p.jsonl\n")
    assert "p.jsonl:2: not a JSON line" in str(info.value)
    assert info.value.issues[0].key == "sweeps[0].prompts[0].file"


def test_ragged_tsv_row_is_located(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text("prompt\tx\na\tb\nc\td\te\n", "utf-8")
    with pytest.raises(ManifestError, match=r"p\.tsv:3: row has 3 fields, the header has 2"):
        prompts_of(tmp_path, "      - file: p.tsv\n")


def test_a_table_without_a_prompt_column_asks_for_one(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("text,kind\na,b\n", "utf-8")
    with pytest.raises(ManifestError, match=r"name one with `column:` \(columns: text, kind\)"):
        prompts_of(tmp_path, "      - file: p.csv\n")


def test_duplicate_prompts_are_planned_once_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a fox\nan owl\na fox\n", "utf-8")
    prompts, warnings = prompts_of(tmp_path, "      - file: p.txt\n      - an owl\n")
    assert [p.text for p in prompts] == ["a fox", "an owl"]
    assert len(warnings) == 1 and "2 duplicate prompt(s) dropped" in warnings[0]


def test_a_file_that_gives_nothing_warns(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# only a comment\n", "utf-8")
    prompts, warnings = prompts_of(tmp_path, "      - file: p.txt\n      - an owl\n")
    assert [p.text for p in prompts] == ["an owl"] and "gives no prompts" in warnings[0]


# --------------------------------------------------------------------------- PartiPrompts


def test_partiprompts_loads_exactly(shared_dir: Path) -> None:
    tsv = shared_dir / "data" / "PartiPrompts.tsv"
    prompts = read_prompt_file(PromptFile(file=tsv, column="Prompt", template=False))
    assert len(prompts) == 1632
    texts = [p.text for p in prompts]
    assert max(len(t) for t in texts) == 389
    assert any('"' in t for t in texts)
    assert "Salvador Dalí" in texts
    assert any("’" in t for t in texts)
    assert set(prompts[0].metadata) == {"Category", "Challenge", "Note", "prompt_source"}
    assert prompts[0].metadata["prompt_source"] == "PartiPrompts.tsv:2"
    animals = read_prompt_file(
        PromptFile(
            file=tsv, column="Prompt", where={"Category": "Animals"}, sample={"n": 50, "seed": 1}
        )
    )
    assert len(animals) == 50 and {p.metadata["Category"] for p in animals} == {"Animals"}


def test_partiprompts_as_a_sweep_keeps_every_row(shared_dir: Path, tmp_path: Path) -> None:
    tsv = shared_dir / "data" / "PartiPrompts.tsv"
    prompts, _ = prompts_of(tmp_path, f"      - file: {tsv}\n        column: Prompt\n")
    # templates are on by default: PartiPrompts has no template syntax, so nothing is rewritten;
    # the few exact duplicate rows are planned once
    raw = read_prompt_file(PromptFile(file=tsv, column="Prompt", template=False))
    assert [p.text for p in prompts] == list(dict.fromkeys(p.text for p in raw))
