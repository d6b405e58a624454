"""The README stays true: CI runs its test command verbatim; its commands name real files and flags."""

import re

from conftest import ROOT


def _code_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    blocks = _code_blocks()
    install_and_train, install_and_test = blocks[0].strip(), blocks[1].strip()
    assert "\n" not in install_and_train and "\n" not in install_and_test
    assert install_and_train.startswith("pip install") and "gptcli train" in install_and_train
    assert "pytest" in install_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run adds -q to pip for quieter logs; otherwise it is the README's line
    assert install_and_test.replace("pip install ", "pip install -q ") in ci


def test_configs_named_in_the_readme_exist():
    text = (ROOT / "README.md").read_text()
    for name in set(re.findall(r"configs/([\w.-]+\.yaml)", text)):
        assert (ROOT / "configs" / name).is_file(), name
