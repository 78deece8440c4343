"""Per-example losses against loops of plain per-example cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from esam_hf import per_example_loss
from esam_hf.trainer import ESAMTrainer

from helpers import TinyConvNet, make_args, make_data


def test_classification_with_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    expected = torch.stack([
        F.cross_entropy(logits[i:i + 1], labels[i:i + 1], label_smoothing=0.1) for i in range(6)
    ])
    torch.testing.assert_close(per_example_loss(logits, labels, label_smoothing=0.1), expected)


@pytest.mark.parametrize("shift", [False, True])
def test_token_level_ignores_minus_100_and_averages_per_sequence(shift):
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 7, 11, generator=g), torch.randint(0, 11, (3, 7), generator=g)
    labels[0, 2:5] = -100
    labels[2, :] = -100  # a sequence with no labelled token has loss 0
    expected = []
    for b in range(3):
        lg, lb = (logits[b, :-1], labels[b, 1:]) if shift else (logits[b], labels[b])
        tokens = [F.cross_entropy(lg[t:t + 1], lb[t:t + 1]) for t in range(len(lb)) if lb[t] != -100]
        expected.append(torch.stack(tokens).mean() if tokens else torch.tensor(0.0))
    torch.testing.assert_close(per_example_loss(logits, labels, shift_labels=shift), torch.stack(expected))


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="per_example_loss_func"):
        per_example_loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"logits \(4, 5, 3\) and labels \(4,\)"):
        per_example_loss(torch.randn(4, 5, 3), torch.zeros(4, dtype=torch.long))


def test_trainer_honours_label_smoothing_factor(tmp_path):
    trainer = ESAMTrainer(model=TinyConvNet(), args=make_args(tmp_path, label_smoothing_factor=0.2),
                          train_dataset=make_data(16))
    logits, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 3])
    got = trainer.compute_per_example_loss({"logits": logits}, {"labels": labels})
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none", label_smoothing=0.2))


def test_tuple_outputs_are_read_as_the_trainer_reads_them():
    from transformers.modeling_outputs import SequenceClassifierOutput

    from esam_hf.losses import infer_head, per_example_scores

    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 2])
    loss = F.cross_entropy(logits, labels)
    batch = {"labels": labels}
    expected = torch.stack([F.cross_entropy(logits[i:i + 1], labels[i:i + 1]) for i in range(4)])
    # (loss, logits) as `return_dict=False` gives it: the logits follow the loss.
    for outputs in [(loss, logits), [loss, logits, torch.randn(4, 8)], SequenceClassifierOutput(loss=loss, logits=logits)]:
        assert infer_head(outputs, batch) == "classification"
        torch.testing.assert_close(per_example_scores("classification", outputs, batch), expected)
    # Shapes that do not say "classifier", or a first element that is no loss: no guess.
    assert infer_head((loss, torch.randn(4, 5, 3)), batch) is None
    assert infer_head((logits, torch.randn(4, 3)), batch) is None
    with pytest.raises(ValueError, match="need logits in the model's outputs"):
        per_example_scores("classification", (logits,), batch)
