"""The documentation stays inside the repository: every relative link in README.md and docs/ resolves to a file of
the repository, and none leaves it."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _links(path: pathlib.Path) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())


def test_links_stay_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 5, "docs/ should hold the index, semantics, ASPD format, ops and decoder pages"
    for page in pages:
        for link in _links(page):
            if re.match(r"[a-z]+://", link):
                continue
            target = (page.parent / link).resolve()
            assert ROOT in target.parents, f"{page.name} links outside the repository: {link}"
            assert target.exists(), f"{page.name} links to a missing file: {link}"


def test_docs_name_every_public_op_and_mode():
    ops = (ROOT / "docs" / "ops.md").read_text()
    for name in ("branch_attention", "branch_attention_with_kvcache", "remap_positions", "rope_append_kv"):
        assert f"## `{name}" in ops, name
    modes = (ROOT / "docs" / "decoder.md").read_text()
    for name in ("generate_serial", "generate_branches", "generate(", "generate_plan", "--plan"):
        assert name in modes, name
