"""The module map of docs/design.md matches the tree; and how tools/module_map.py builds and checks one."""

from __future__ import annotations

from pathlib import Path

import module_map
import pytest


def test_the_module_map_in_docs_design_matches_the_tree() -> None:
    problems = module_map.check()
    assert problems == [], "docs/design.md's module map is stale: run `python tools/module_map.py`\n" + "\n".join(
        problems
    )


def _tree(root: Path) -> Path:
    (root / "docs").mkdir()
    (root / "docs" / "design.md").write_text(
        f"# notes\n\n{module_map.START}\nold\n{module_map.END}\n\nThe rest stays.\n"
    )
    (root / "mqexec" / "sub").mkdir(parents=True)
    (root / "dirac_submit").mkdir()
    (root / "mqexec" / "__init__.py").write_text('"""The package: it does things.\n\nMore words."""\n')
    (root / "mqexec" / "small.py").write_text('"""A ``x | y`` pipe,\nover two lines; :class:`~a.b.Thing`."""\n')
    body = "x = 1\n" * module_map.LIMIT
    (root / "mqexec" / "big.py").write_text(f'"""Big.\n\nOne piece because: its parts\nshare one lock."""\n{body}')
    (root / "mqexec" / "huge.py").write_text(f'"""Huge, and silent about it."""\n{body}')
    (root / "mqexec" / "sub" / "__init__.py").write_text("")
    (root / "dirac_submit" / "a.py").write_text('"""A."""\n')
    return root


def test_rows_say_job_size_and_why_one_piece(tmp_path: Path) -> None:
    rows = {r.path: r for r in module_map.modules(_tree(tmp_path))}
    assert list(rows) == [
        "mqexec/__init__.py",
        "mqexec/big.py",
        "mqexec/huge.py",
        "mqexec/small.py",
        "mqexec/sub/__init__.py",
        "dirac_submit/a.py",
    ]
    assert rows["mqexec/__init__.py"].job == "The package: it does things."
    assert rows["mqexec/small.py"].job == "A ``x \\| y`` pipe, over two lines; `Thing`."
    assert (rows["mqexec/small.py"].lines, rows["mqexec/small.py"].why) == (2, "")
    assert rows["mqexec/big.py"].why == "its parts share one lock."
    assert rows["mqexec/huge.py"].why == "*not said yet*"
    assert rows["mqexec/sub/__init__.py"].job == "— (no docstring)"


def test_a_written_map_checks_out_and_the_rest_of_the_file_stays(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert module_map.update(root)
    assert not module_map.update(root)  # written once
    assert module_map.check(root) == []
    text = (root / "docs" / "design.md").read_text()
    assert text.startswith(f"# notes\n\n{module_map.START}\n## Module map\n")
    assert text.endswith(f"{module_map.END}\n\nThe rest stays.\n") and "old" not in text
    assert "| `mqexec/big.py` | 404 | Big. | its parts share one lock. |" in text
    assert module_map.parse(text) == module_map.modules(root)


def test_what_makes_the_map_stale(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    module_map.update(root)
    big = root / "mqexec" / "big.py"
    big.write_text(big.read_text() + "y = 2\n" * module_map.tolerance(404))
    assert module_map.check(root) == []  # a size drifting a little does not count
    big.write_text(big.read_text() + "y = 2\n")
    assert module_map.check(root) == ["mqexec/big.py: 445 lines, the map says 404"]
    (root / "mqexec" / "small.py").write_text('"""A new job."""\n')
    (root / "mqexec" / "new.py").write_text('"""New."""\n')
    (root / "dirac_submit" / "a.py").unlink()
    (root / "mqexec" / "huge.py").write_text('"""Huge, cut down."""\nx = 1\n')
    assert module_map.check(root) == [
        "dirac_submit/a.py is in the map but not in the tree",
        "mqexec/big.py: 445 lines, the map says 404",
        "mqexec/huge.py: 2 lines, the map says 401",
        f"mqexec/huge.py: its 'over {module_map.LIMIT} lines' note changed",
        "mqexec/huge.py: its docstring's first paragraph changed",
        "mqexec/new.py is not in the map",
        "mqexec/small.py: its docstring's first paragraph changed",
    ]
    module_map.update(root)
    assert module_map.check(root) == []


def test_missing_markers_are_one_sentence(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "docs" / "design.md").write_text(f"# notes\n{module_map.END}\n{module_map.START}\n")
    with pytest.raises(ValueError, match="must hold the markers <!-- module-map:start --> and <!-- module-map:end -->"):
        module_map.check(root)


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path)
    assert module_map.main(["--check"], root) == 1
    err = capsys.readouterr().err
    assert "module map: mqexec/big.py is not in the map" in err
    assert "docs/design.md's module map is stale: run `python tools/module_map.py` and commit it" in err
    assert module_map.main([], root) == 0
    assert capsys.readouterr().out == "docs/design.md: module map updated\n"
    assert module_map.main(["--check"], root) == 0
    (root / "docs" / "design.md").write_text("no markers")
    assert module_map.main(["--check"], root) == 1
    assert "module map: docs/design.md must hold the markers" in capsys.readouterr().err
