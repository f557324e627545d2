"""FSDP2 composes with the model as the trainer will use it: fully_shard per decoder layer + root,
activation checkpointing on, one process (gloo on CPU)."""

import pytest
import torch
import torch.distributed as dist

from trainer.model import Gemma2Classifier
from trainer.model.testing import pack, randomize_norms, tiny_args
from trainer.parallel import apply_activation_checkpointing


@pytest.fixture
def gloo_world(tmp_path):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fully_shard_per_layer_with_activation_checkpointing(gloo_world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batch = pack([torch.randint(1, 128, (n,), generator=g) for n in (9, 17, 4)])
    ref = Gemma2Classifier(tiny_args(head="mlp", head_dropout=0.0))
    randomize_norms(ref)
    model = Gemma2Classifier(tiny_args(head="mlp", head_dropout=0.0))
    model.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(model)
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)

    for m in (ref, model):
        m.train()
        m(**batch).logsumexp(-1).sum().backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=n)
