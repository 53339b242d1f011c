import numpy as np
import pandas as pd
import pytest
import torch

from ctrldiff.ctrl import CTRLLoss, RolloutConfig
from ctrldiff.tasks import JointReward, join, multitask_labels, split_joint
from tests.conftest import micro_reward


def test_joint_reward_is_the_weighted_sum_of_the_per_task_log_probabilities():
    first, second = micro_reward(num_classes=2, seed=1), micro_reward(num_classes=3, seed=2)
    joint = JointReward([first, second], [1.0, 0.5])
    x = torch.randn(5, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3, 5])
    y1, y2 = (torch.as_tensor(a) for a in split_joint(y.numpy(), [2, 3]))
    expected = first.log_prob(x, y1) + 0.5 * second.log_prob(x, y2)
    torch.testing.assert_close(joint.log_prob(x, y), expected)
    assert joint(x).shape == (5, 6)


def test_joint_reward_with_unit_weights_is_a_normalised_joint_distribution():
    joint = JointReward([micro_reward(2, seed=1), micro_reward(2, seed=2)], [1.0, 1.0])
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(joint(x).exp().sum(-1), torch.ones(3))


def test_ctrl_loss_accepts_the_joint_reward(base):
    from ctrldiff.control import add_control

    joint = JointReward([micro_reward(2, seed=1), micro_reward(2, seed=2)], [1.0, 1.0])
    model = add_control(base, list(range(4)), lora_rank=2)
    loss_fn = CTRLLoss(joint.requires_grad_(False), 10.0, RolloutConfig(steps=3, grad_steps=1))
    noise = torch.randn(4, 4, 1, 8, 8)
    loss, _ = loss_fn(model, torch.tensor([0, 1, 2, 0]), torch.arange(4), noise)
    loss.backward()
    assert torch.isfinite(loss) and model.y_embedding.weight.grad is not None


def test_split_and_join_are_inverse_row_major():
    y = np.arange(6)
    parts = split_joint(y, [2, 3])
    assert parts[0].tolist() == [0, 0, 0, 1, 1, 1] and parts[1].tolist() == [0, 1, 2, 0, 1, 2]
    assert join(parts, [2, 3]).tolist() == y.tolist()


def test_multitask_labels_live_on_disjoint_halves():
    rng = np.random.default_rng(0)
    n = 40
    half = np.where(np.arange(n) % 2 == 0, "compressibility", "ink")
    table = pd.DataFrame(
        {
            "jpeg_bytes": rng.integers(500, 900, n),
            "half": half,
            "y_ink": np.where(half == "ink", rng.integers(0, 2, n), -1),
        }
    )
    meta = {
        "tasks": {
            "compressibility": {"oracle": "JPEG", "jpeg_quality": 95},
            "ink": {"column": "y_ink", "classes": [0, 1], "thresholds": [0.2]},
        }
    }
    out, out_meta, metrics = multitask_labels(table, meta, compressibility_classes=2)
    assert out_meta["control"] == ["compressibility_half", "ink"]
    assert metrics["images_with_both_labels"] == 0
    assert metrics["labelled"] == {"compressibility_half": 20, "ink": 20}
    on_half = out.y_compressibility_half[half == "compressibility"]
    assert (out.y_compressibility_half[half == "ink"] == -1).all() and (on_half >= 0).all()
    assert metrics["counts"]["compressibility_half"] == [10, 10]  # cut at its own half's median
    assert "control" not in meta  # the input meta is left alone


@pytest.mark.parametrize("weights", [[1.0], [1.0, 1.0, 1.0]])
def test_joint_reward_refuses_a_weight_per_task_mismatch(weights):
    with pytest.raises(ValueError, match="reward weights"):
        JointReward([micro_reward(2), micro_reward(2)], weights)
