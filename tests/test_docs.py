"""Every Python code block of the guides runs, in order, as a reader would run it.

Each page is one test: its ```python blocks execute in one namespace, top to bottom, from
the repository's root (so `../shared/data` and the embedded digits are found as the pages
say). A page that shows output states it in the prose, not in the blocks.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("getting-started.md")) + sorted(
    (ROOT / "docs" / "guides").glob("*.md")
)
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def code_blocks(page):
    """The ```python blocks of a Markdown page, in order."""
    return _BLOCK.findall(page.read_text())


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.stem)
def test_guide_code_runs(page, monkeypatch, tmp_path, mirrored_strategy):
    blocks = code_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no Python code")
    monkeypatch.chdir(tmp_path)  # Files a guide writes land in a temporary directory.
    # A page's `get_strategy("mirrored")` gets the test session's one MirroredStrategy over
    # its two logical CPUs (a second one in the same process collides on collective keys).
    from keras_fip import distribute

    resolve = distribute.get_strategy
    monkeypatch.setattr(
        distribute,
        "get_strategy",
        lambda name="default", **kwargs: (
            mirrored_strategy if name == "mirrored" else resolve(name, **kwargs)
        ),
    )
    namespace = {"__name__": f"docs_{page.stem}"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page.name}[block {index}]", "exec"), namespace)
        except Exception as error:  # Name the block that failed.
            raise AssertionError(f"{page.name}, block {index} failed:\n{block}") from error


def test_every_guide_in_the_navigation_has_code():
    for page in (ROOT / "docs" / "guides").glob("*.md"):
        if page.stem != "scaling-out":
            assert code_blocks(page), f"{page.name} shows no runnable code"
