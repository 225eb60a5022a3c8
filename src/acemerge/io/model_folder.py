"""Everything in an output folder besides the weights: config, tokenizer, card, merge YAML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from acemerge import __version__

if TYPE_CHECKING:
    from acemerge.config import MergeConfig
    from acemerge.io.readers import Checkpoint
    from acemerge.plan import Plan

#: Files copied from the base folder (besides config.json, which is rewritten).
COPIED_PATTERNS = (
    "generation_config.json", "tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "*.model", "*.tiktoken", "preprocessor_config.json",
    "chat_template*",
)
CONFIG_FILE = "acemerge_config.yaml"


def write_model_folder_extras(
    folder: Path, base: Checkpoint, cfg: MergeConfig, plan: Plan, *,
    copy_tokenizer: bool = True, write_card: bool = True,
    adapter_energy: dict[str, float] | None = None,
) -> None:
    """Write config.json, tokenizer files, README.md and the merge YAML into ``folder``."""
    if base.config is not None and adapter_energy is None:  # an adapter has no config.json
        config = dict(base.config)
        if cfg.dtype:
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = cfg.dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    mergekit = cfg.mergekit or {}
    source = tokenizer_folder(base, mergekit)
    if copy_tokenizer and source is not None:
        for pattern in COPIED_PATTERNS:
            for path in sorted(source.glob(pattern)):
                if path.is_file():
                    shutil.copy2(path, folder / path.name)
    if mergekit.get("chat_template"):
        (folder / "chat_template.jinja").write_text(chat_template_text(mergekit["chat_template"]))
    if mergekit:
        from acemerge.mergekit_schema import mergekit_yaml

        (folder / CONFIG_FILE).write_text(mergekit_yaml(cfg))
    else:
        (folder / CONFIG_FILE).write_text(cfg.with_absolute_paths().to_yaml())
    if write_card:
        card = model_card(cfg, plan, base.config)
        if adapter_energy is not None:
            card += adapter_card_section(adapter_energy)
        (folder / "README.md").write_text(card)


def adapter_card_section(energy: dict[str, float]) -> str:
    """The energy of the merged update each adapter module keeps."""
    lines = ["## LoRA output", "", "Energy of the merged update kept per module "
             "(||truncated||^2 / ||update||^2):", ""]
    lines += [f"- `{module}`: {100 * kept:.4f}%" for module, kept in sorted(energy.items())]
    return "\n".join(lines) + "\n"


def tokenizer_folder(base: Checkpoint, mergekit: dict) -> Path | None:
    """Where tokenizer files come from: the base, or mergekit's ``tokenizer_source`` model."""
    tokenizer = mergekit.get("tokenizer") or {}
    source = tokenizer.get("source") or mergekit.get("tokenizer_source")
    if source in (None, "base"):
        return base.folder
    from acemerge.io.readers import open_checkpoint

    return open_checkpoint(source).folder


def chat_template_text(template: str) -> str:
    """mergekit's ``chat_template`` as Jinja text (named templates are not bundled here)."""
    if "{" not in template:
        from acemerge.errors import AceMergeError

        raise AceMergeError(f"chat_template '{template}': named templates are not supported; "
                            "give the Jinja template text")
    return template


def model_card(cfg: MergeConfig, plan: Plan, model_config: dict | None = None) -> str:
    """A Hugging Face model card naming the method, its resolved parameters and the inputs."""
    from acemerge import methods

    method = methods.get(cfg.merge_method)
    params = method.for_model(method.validate(cfg.parameters), model_config).model_dump()
    counts = plan.counts()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, acemerge, " + cfg.merge_method + "]",
        f"base_model: {json.dumps(cfg.base_model)}",
        "---",
        "",
        f"# {(cfg.mergekit or {}).get('name') or f'Merged model ({method.name})'}",
        "",
        f"Merged with [acemerge](https://pypi.org/project/acemerge/) {__version__} using "
        f"**{method.name}**: {method.summary} ({method.paper}).",
        "",
        "## Inputs",
        "",
        f"- base: `{cfg.base_model}`",
        *[f"- expert: `{path}`" for path in cfg.expert_paths],
        "",
        "## Settings",
        "",
        f"- scaling coefficient: {cfg.resolved_scale:g}",
        *[f"- {key}: {value}" for key, value in params.items()],
        f"- compute dtype: {cfg.compute_dtype}; output dtype: {cfg.dtype or 'as the base'}",
        f"- excluded (kept at base): {', '.join(f'`{p}`' for p in plan.exclude) or 'nothing'}",
        f"- parameters: {counts['matrix']} merged as matrices, {counts['other']} by "
        f"{method.other_rule_name}, {counts['keep']} kept",
        "",
        f"The exact configuration is in `{CONFIG_FILE}`; rerun it with "
        f"`acemerge merge --config {CONFIG_FILE} --out DIR`.",
        "",
    ]
    return "\n".join(lines)
