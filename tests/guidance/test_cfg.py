import torch

from ctrldiff.control import add_control
from ctrldiff.guidance.cfg import CFGOnY, train_cfg
from tests.conftest import micro_base
from tests.guidance.common import run


def test_untrained_control_with_any_scale_is_the_base_sampler():
    reference = run(micro_base())
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2)
    torch.testing.assert_close(run(model.base, CFGOnY(3.0)), reference, atol=1e-5, rtol=1e-5)


def test_training_on_triples_moves_only_the_control_and_lowers_the_loss():
    model = add_control(micro_base(), [0, 1, 2, 3], lora_rank=2)
    frozen = {n: p.clone() for n, p in model.base.unet.named_parameters() if not p.requires_grad}
    x = torch.rand(32, 1, 8, 8) * 2 - 1
    c, y = torch.randint(0, 3, (32,)), torch.randint(0, 4, (32,))
    losses = train_cfg(
        model, x, c, y, steps=30, batch_size=16, lr_lora=1e-2, lr_embedding=1e-1, dropout=0.1, seed=0
    )
    assert sum(losses[-5:]) < sum(losses[:5])
    assert all(torch.equal(p, frozen[n]) for n, p in model.base.unet.named_parameters() if n in frozen)
    assert model.y_embedding.table()[model.y_null].abs().sum() == 0
    assert model.y_embedding.weight[:4].abs().sum() > 0
