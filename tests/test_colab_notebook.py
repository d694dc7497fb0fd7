"""run_google_colab.ipynb is a valid nbformat-4 notebook whose commands are the README's."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebook() -> dict:
    """The notebook as JSON."""
    return json.loads((ROOT / "run_google_colab.ipynb").read_text())


def test_notebook_is_valid_nbformat_4() -> None:
    nb = notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["metadata"], dict)
    ids = [cell["id"] for cell in nb["cells"]]
    assert len(ids) == len(set(ids))
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["metadata"], dict)
        assert all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(l for l in cell["source"] if not l.lstrip().startswith(("!", "%"))), "cell", "exec")


def test_notebook_commands_are_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [
        line.strip()[1:]
        for cell in notebook()["cells"] if cell["cell_type"] == "code"
        for line in cell["source"] if re.match(r"\s*!(python|pip)\b", line)
    ]
    assert len(commands) >= 3
    for command in commands:
        assert command in readme, f"notebook command not in README.md: {command}"

