"""Bad input on the command line: one clear line, a non-zero exit code, no traceback."""

import pytest
from typer.testing import CliRunner

from dhat_seg.run.checkpoint import save_weights
from dhat_seg.cli import app
from dhat_seg.models import create_model
from cli_helpers import assert_one_line_error

runner = CliRunner()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--method", "magic"], ["method 'magic' is unknown", "dhat"]),
        (["--model", "vgg99"], ["model 'vgg99' is unknown", "small_cnn"]),
        (["--data", "imagenet42"], ["imagenet42"]),
        (["--epochs", "-3"], ["-3", "positive"]),
        (["--config", "nope.yaml"], ["nope.yaml", "does not exist"]),
        (["--attention-model", "missing/model.safetensors"], ["missing/model.safetensors", "does not exist"]),
        (["--set", "nonsense=1"], ["'nonsense' is unknown"]),
        (["--resume"], ["--resume needs --out"]),
        (["--device", "cuda:7"] , ["cuda:7"]),
    ],
)
def test_train_bad_input(tmp_path, args, needles):
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")] + args
                           if "--resume" not in args else ["train", "--resume"])
    assert_one_line_error(result, *needles)


def test_existing_run_dir_needs_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: dhat\n")
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert_one_line_error(result, "already holds a run", "--resume")


def test_eval_wrong_architecture_and_corrupt_checkpoints(tmp_path):
    weights = tmp_path / "m.safetensors"
    save_weights(create_model("small_cnn", 10), weights, "small_cnn")
    data = weights.read_bytes()
    # metadata says resnet18 but the tensors are a small CNN's
    (tmp_path / "liar.safetensors").write_bytes(data.replace(b'"small_cnn"', b'"resnet18" '))
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path / "liar.safetensors"), "--attacks", "clean"]),
                          "does not fit the model")
    (tmp_path / "corrupt.safetensors").write_bytes(data[:100])
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path / "corrupt.safetensors")]), "corrupt")
    assert_one_line_error(runner.invoke(app, ["eval", str(tmp_path / "nothing")]), "does not exist")
    assert_one_line_error(runner.invoke(app, ["eval", str(weights), "--attacks", "pgd7"]), "attack 'pgd7' is unknown")


def test_resume_of_a_folder_without_a_run_and_an_unwritable_out(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(runner.invoke(app, ["train", "--resume", "--out", str(tmp_path / "empty")]),
                          "holds no run to resume")
    (tmp_path / "file").write_text("not a folder")
    assert_one_line_error(runner.invoke(app, ["train", "--out", str(tmp_path / "file" / "run"), "--epochs", "1",
                                              "--cache-dir", str(tmp_path / "c")]), "cannot be written")
