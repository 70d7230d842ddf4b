"""Every recipe the package ships loads with the configuration of the command that runs it.

A recipe's name says its command (pretraining's have none of the prefixes below); a new
prefix must be added here, so no shipped recipe goes unchecked.
"""

from __future__ import annotations

import pytest

from lmforge.cli.common import SHIPPED_RECIPES


def _align(cls_name):
    def load(path):
        import yaml

        from lmforge.align import config as align_config

        return align_config.config_from_dict(getattr(align_config, cls_name), yaml.safe_load(path.read_text()))
    return load


def _loader(name: str):
    from lmforge.guard.train import load_guard_recipe
    from lmforge.train.recipe import load_recipe
    from lmforge.tune.classify import load_classify_recipe
    from lmforge.tune.distill import load_distill_recipe
    from lmforge.tune.sft import load_finetune_recipe
    from lmforge.tune.translation_recipe import load_translation_recipe

    table = [("sft-", load_finetune_recipe), ("safety-sft-", load_finetune_recipe),
             ("classify-", load_classify_recipe), ("tag-", load_classify_recipe),
             ("distill-", load_distill_recipe), ("dpo-", _align("DPOConfig")),
             ("safety-dpo-", _align("DPOConfig")), ("reward-", _align("RewardConfig")),
             ("ppo-", _align("PPOConfig")), ("grpo-", _align("GRPOConfig")), ("tiny-", load_recipe), ("mlm-", load_recipe),
             ("guard-", load_guard_recipe), ("translate-", load_translation_recipe)]
    matches = [loader for prefix, loader in table if name.startswith(prefix)]
    assert len(matches) == 1, f"{name}: add its command's loader to this test's table"
    return matches[0]


@pytest.mark.parametrize("path", sorted(SHIPPED_RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipe_loads_with_its_command(path):
    config = _loader(path.name)(path)
    assert config is not None and type(config).__name__.endswith("Config")
