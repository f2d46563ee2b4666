"""The one-process assembly exports use (``assemble_single_process``) materialises the model on both paths."""

from __future__ import annotations

import torch

from framework.hooks import hookimpl
from framework.train.assembly import assemble_single_process
from framework.train.launch import load_job
from tests.integration.launch import QUICKSTART, TINY


class ReadsWeights:
    """Transforms from real weights and has no init hook: the whole-model path."""

    @hookimpl
    def expertrain_transform_model(self, model, config):
        model.doubled = torch.nn.Parameter(model.norm.weight.detach() * 2)


def test_a_plugin_that_reads_weights_gets_them_and_nothing_stays_on_meta() -> None:
    config, pm = load_job(str(QUICKSTART), list(TINY), world=1)
    pm.register_object("reads_weights", ReadsWeights())
    assembled = assemble_single_process(config, pm)
    assert assembled.whole_on_every_rank is not None
    assert not any(p.is_meta for p in assembled.raw.parameters())
    assert torch.equal(assembled.raw.doubled, torch.full_like(assembled.raw.doubled, 2.0))  # norms start at 1
