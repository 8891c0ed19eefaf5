"""The docs' generated blocks: every block scripts/results.py fills has its markers, and the table of
grains in docs/ARCHITECTURE.md is the one storage/schema.py declares."""

import re

from scripts import results


def test_the_grains_table_matches_the_schema():
    assert results.main(["--schema-only", "--check"]) == 0


def test_every_generated_block_has_its_markers():
    placeholder = object.__new__(results.Results)  # the block list only, no warehouse
    styled, styled_open = object.__new__(results.FactorResults), object.__new__(results.FactorResults)
    styled.tag, styled_open.tag = "", "open"
    for block in results.blocks(placeholder, styled, styled_open):
        text = block.path.read_text()
        assert f"<!-- generated:{block.name} -->\n" in text and f"\n<!-- /generated:{block.name} -->" in text, (
            block.path.name, block.name)


def test_a_block_is_replaced_between_its_markers_only():
    text = "a\n<!-- generated:x -->\nold\n<!-- /generated:x -->\nb\n"
    assert results.replace_block(text, "x", "new") == "a\n<!-- generated:x -->\nnew\n<!-- /generated:x -->\nb\n"


def test_the_architecture_table_lists_each_assets_parents_as_the_graph_has_them():
    from pipelines.definitions import build_definitions

    # the default graph, a text-conditional one (which adds `prompts`) and a text-conditional one with a judge
    want: dict[str, set[str]] = {}
    for config in ("tide.toml", "configs/tiny-pixart.toml", "configs/styled-digits.toml"):
        graph = build_definitions(str(results.REPO / config)).resolve_asset_graph()
        for k in graph.materializable_asset_keys:
            want.setdefault(k.to_user_string(), set()).update(p.to_user_string() for p in graph.get(k).parent_keys)
    documented = {}
    for line in results.ARCHITECTURE.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a literal bar
        if len(cells) == 4 and cells[0].startswith("`") and cells[0].strip("`") in want:
            documented[cells[0].strip("`")] = set() if cells[1] == "-" else set(cells[1].split(", "))
    assert documented == want
