"""Every `python` and `bash` block of the README, and of the model card `esam-hf train` writes, runs as
written: in a fresh folder, in order, each in a new process, as a user pastes them.

The fixture, the only difference from a user's paste, cuts training short: bash blocks run with a
shell function `esam-hf` that appends `--max_steps 2 --max_eval_samples 100` (and `--seeds 0` to
`reproduce`); python blocks that build TrainingArguments run after `SHORT_TRAINING`, which caps
`max_steps` at 2. A block tagged `no-test` (```bash no-test) installs packages, needs the Hub or a GPU,
or is the test suite itself; it is skipped on purpose. The expected counts make a block skipped by
mistake, a new block, or a block in a language the test cannot run, fail the test.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 2
# (blocks run, blocks tagged no-test): change these only together with the blocks themselves.
README_BLOCKS = (4, 5)
CARD_TEMPLATE_BLOCKS = 1  # python blocks of model_cards/image_classification.md, all run from the demo's card
RUNNABLE = ("python", "bash")
NOT_CODE = ("bibtex", "yaml", "json", "text", "")

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SHORT_TRAINING = f"""\
import transformers as _transformers  # test fixture: training cut to {MAX_STEPS} steps
_post_init = _transformers.TrainingArguments.__post_init__
def _short(self):
    _post_init(self)
    self.max_steps = {MAX_STEPS}
_transformers.TrainingArguments.__post_init__ = _short
"""
SHORT_COMMANDS = f"""\
esam-hf() {{  # test fixture: training cut to {MAX_STEPS} steps and 100 test images, reproduce to one seed
  case "$1" in
    train) set -- "$@" --max_steps {MAX_STEPS} --max_eval_samples 100 ;;
    reproduce) set -- "$@" --max_steps {MAX_STEPS} --max_eval_samples 100 --seeds 0 ;;
  esac
  command esam-hf "$@"
}}
"""


def code_blocks(text: str) -> list[tuple[str, list[str], str]]:
    """(language, further info-string words, code) of every fenced block, in order."""
    blocks = []
    for info, code in FENCE.findall(text):
        language, *tags = info.split() or [""]
        blocks.append((language, tags, code))
    return blocks


def runnable(blocks, where: str) -> tuple[list[tuple[str, str]], int]:
    """The (language, code) blocks to run and the number tagged no-test; a block in a shell or Python
    dialect the test does not run is an error, so it cannot be skipped unnoticed."""
    run, skipped = [], 0
    for language, tags, code in blocks:
        if language in RUNNABLE and "no-test" in tags:
            skipped += 1
        elif language in RUNNABLE:
            run.append((language, code))
        elif language not in NOT_CODE:
            raise AssertionError(f"{where}: a ```{language} block; tag it python or bash (or no-test) so it is run")
    return run, skipped


def run_block(language: str, code: str, cwd: Path, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if language == "python":
        prelude += SHORT_TRAINING if "TrainingArguments" in code else ""
        command = [sys.executable, "-c", prelude + code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", SHORT_COMMANDS + code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"this block failed in {cwd}:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's blocks, run in order in one fresh folder (the reload snippet loads what the demo saved)."""
    folder = tmp_path_factory.mktemp("fresh")
    blocks, skipped = runnable(code_blocks((ROOT / "README.md").read_text()), "README.md")
    outputs = [(code, run_block(language, code, folder).stdout) for language, code in blocks]
    return folder, outputs, skipped


def test_every_readme_block_runs_in_a_fresh_folder(readme_run):
    folder, outputs, skipped = readme_run
    assert (len(outputs), skipped) == README_BLOCKS
    demo = folder / "outputs" / "demo"
    assert (demo / "README.md").is_file() and (demo / "model.safetensors").is_file()
    printed = dict(outputs)
    demo_output = next(out for code, out in printed.items() if "esam-hf train --recipe demo" in code)
    assert "| demo (esam) |" in demo_output and "top-1 %" in demo_output  # it ends with the test accuracy
    reload_output = next(out for code, out in printed.items() if "from_pretrained(\"outputs/demo\"" in code)
    assert "- true label:" in reload_output and "'label':" in reload_output


def test_the_cards_snippet_runs_beside_the_model_without_esam_hf(readme_run):
    """The card `esam-hf train` wrote for the demo: its snippet loads `./demo` from the folder that holds
    it, as the card says, in a process where esam_hf cannot be imported (the model's code travels with it)."""
    folder, _, _ = readme_run
    card = (folder / "outputs" / "demo" / "README.md").read_text()
    blocks, skipped = runnable(code_blocks(card), "the demo's card")
    template = (ROOT / "model_cards" / "image_classification.md").read_text()  # its fences follow placeholders
    assert len(blocks) == template.count("```python") + template.count("```bash") == CARD_TEMPLATE_BLOCKS
    assert skipped == 0
    assert "`./demo` is this card's folder" in card
    for language, code in blocks:
        assert 'model="./demo", trust_remote_code=True' in code and "# trust_remote_code=True: the model's code" in code
        done = run_block(language, code, folder / "outputs", prelude="import sys\nsys.modules['esam_hf'] = None\n")
        assert "'score':" in done.stdout


def test_the_extractor_finds_tags_and_refuses_unknown_languages():
    text = "a\n```bash no-test\npip install x\n```\n\n```python\nprint(1)\n```\n\n```bibtex\n@x{}\n```\n"
    assert code_blocks(text) == [("bash", ["no-test"], "pip install x\n"), ("python", [], "print(1)\n"),
                                 ("bibtex", [], "@x{}\n")]
    assert runnable(code_blocks(text), "t") == ([("python", "print(1)\n")], 1)
    with pytest.raises(AssertionError, match="```sh block"):
        runnable(code_blocks("```sh\nls\n```\n"), "t")
