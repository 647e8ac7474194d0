"""`coder-index build`: create an index (or add to one) from a class list and text sources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import friendly_errors, print_json
from .options import ENGINE, GENERATOR, LLM_CLIENT, check_engine_options, options
from .textgen_commands import make_generator, parse_kinds, report_generation


@click.command()
@click.argument("index_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", "classes_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Class names, one per line, in label order [default: the list shipped for --dataset].")
@click.option("--dataset", default=None,
              help="Use this dataset's prompt templates (e.g. imagenet, oxford_pets, eurosat, dtd, food101, or a "
                   "released key such as ImageNet, oxford-pet, DTD, CUB200), and its shipped class list unless "
                   "--classes is given (lists ship for every dataset of --preset cvpr24).")
@options("preset")
@click.option("--task", type=click.Choice(["zero-shot", "few-shot"]), default=None,
              help="With --preset cvpr24: the released wording of attribute/analogous texts differs per task "
                   "[default: zero-shot].")
@click.option("--expert-knowledge", "expert_knowledge", default=None, type=click.Path(exists=True, file_okay=False),
              help="The authors' released expert_knowledge/ folder: imports attributes, analogous classes, synonyms "
                   "and one-to-one features of --dataset (with --preset cvpr24). Its .pkl files are read without "
                   "running any code.")
@click.option("--descriptors", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON {class: [descriptor, ...]} stored as attribute texts '{class} which has {descriptor}'. "
                   "Repeatable. The published GPT-3 descriptors of ImageNet, CUB, DTD, EuroSAT, Food-101, Pets and "
                   "Places (descriptors/descriptors_*.json of github.com/sachit-menon/classify_by_description_release) "
                   "are not shipped: their repository shows no licence.")
@click.option("--knowledge", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Knowledge file from `coder-index generate` (or descriptor / CuPL JSON): all its kinds go "
                   "into the index. Repeatable.")
@click.option("--generate", "generate_kinds", default=None, metavar="KINDS",
              help="Generate these kinds on the fly (e.g. attribute,analogous,synonym) with the LLM options below.")
@options(*GENERATOR, *LLM_CLIENT, "new_model", "pretrained", "device", *ENGINE)
@click.option("--text-cache", "text_cache", default=None, metavar="FILE|off",
              help="Where text embeddings are remembered per model weights, so that no text is encoded twice by "
                   "the same weights (a rebuild, another index over the same texts) [default: "
                   "~/.cache/coder-index/text-embeddings.sqlite]; 'off': encode every text.")
@click.option("--overwrite", is_flag=True, help="Delete the index already in INDEX_DIR first (damaged or not; only "
                                               "an index's own files are deleted) and build afresh.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def build(index_dir: Path, classes_file: str | None, dataset: str | None, preset: str | None, task: str | None,
          expert_knowledge: str | None, descriptors: tuple[str, ...], knowledge: tuple[str, ...],
          generate_kinds: str | None, model: str | None, pretrained: str | None, device: str | None,
          engine: str, ray_address: str | None, ray_actors: int | None, ray_gpus: float, text_cache: str | None,
          overwrite: bool,
          as_json: bool, quiet: bool, dry_run: bool, **llm: Any) -> None:
    """Create INDEX_DIR (or add to it) from a class list and attribute files.

    The classes come from --classes, or from the list shipped for --dataset. Name texts come
    from the dataset's templates; descriptor files add attribute texts; knowledge
    files (from `coder-index generate`) add attribute, analogous and synonym texts; --generate makes
    them on the fly. Running build again with more files adds only what is new.

    \b
    Examples:
      coder-index build in1k --dataset imagenet --model ViT-B-32 --pretrained openai   # shipped class list
      coder-index build pets-index --classes oxford-pet.txt --dataset oxford_pets \\
          --descriptors descriptors_pets.json --model ViT-B-32 --pretrained openai
      coder-index build in1k --classes ImageNet.txt --descriptors descriptors_imagenet.json \\
          --model ViT-L-14 --pretrained /models/vit-l-14.bin
      coder-index build tiny --classes classes.txt --model local-dir:/models/my-clip
      coder-index build in1k --classes ImageNet.txt --knowledge imagenet-knowledge.json
      coder-index build in1k --classes ImageNet.txt --generate attribute,analogous,synonym --llm none
      coder-index build in1k-cvpr24 --classes ImageNet.txt --dataset ImageNet --preset cvpr24 \\
          --expert-knowledge expert_knowledge/ --model ViT-B-32 --pretrained openai
      coder-index build in21k --classes in21k.txt --knowledge in21k-knowledge.json --engine ray --ray-address auto
      coder-index build pets-index --overwrite --classes oxford-pet.txt --dataset oxford_pets \\
          --descriptors descriptors_pets.json --model ViT-B-32 --pretrained openai   # a damaged index, afresh
    """
    from coder_index.pipeline.build import build_index
    from coder_index.textgen.knowledge import load_knowledge

    check_engine_options(engine, ray_address, ray_actors, ray_gpus)
    if classes_file is None:
        from coder_index.core.presets import shipped_class_list, shipped_class_lists

        if dataset is None:
            raise click.UsageError("name the classes: --classes FILE (one class name per line, in label order), or "
                                   "--dataset NAME for the list shipped with coder-index (" +
                                   ", ".join(shipped_class_lists()) + ")")
        classes_file = str(shipped_class_list(dataset))
        if not quiet and not as_json:
            click.echo(f"classes: the list shipped for {dataset} ({Path(classes_file).name}, from the released "
                       "CODER code)", err=True)
    encode_with = None
    if engine == "ray":
        from coder_index.engines.ray_text import RayTextEncoder

        def encode_with(encoder):  # noqa: ANN001, ANN202 - the model is known once build_index loads it
            return RayTextEncoder(encoder, address=ray_address, actors=ray_actors, gpus_per_actor=ray_gpus,
                                  progress=not quiet)

    loaded = [load_knowledge(p) for p in knowledge]
    generate = None
    if generate_kinds:
        kinds = parse_kinds(generate_kinds)

        def generate(encoder, classes, recipe):  # noqa: ANN001, ANN202 - callback of build_index
            gen = make_generator(encoder, **llm, prompts=recipe.preset)
            if dry_run:
                d = gen.dry_run(classes, kinds)
                raise click.ClickException(f"dry run: would send {d.prompts} prompt(s) ({d.cached} cached); "
                                           "nothing was built")
            k, stats = gen.generate(classes, kinds, progress=not quiet)
            report_generation(stats)
            return k

    report = build_index(index_dir, classes_file, model=model, pretrained=pretrained, dataset=dataset, preset=preset,
                         task=task, descriptors=list(descriptors), device=device, knowledge=loaded,
                         expert_knowledge=expert_knowledge, generate=generate, progress=not quiet,
                         encode_with=encode_with, overwrite=overwrite,
                         text_cache=False if text_cache == "off" else text_cache)
    if as_json:
        print_json(report.__dict__)
        return
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    added = ", ".join(f"{v} {k}" for k, v in report.added.items())
    click.echo(f"{index_dir}: {report.classes} classes, {report.recipe}; added {added} texts; "
               f"{report.duplicates} already present")
    spent = report.text_encoding
    if spent.get("from_cache"):
        click.echo(f"encoded {spent['encoded']} text(s), read {spent['from_cache']} from the text cache "
                   f"({spent['seconds']:.1f} s)", err=True)
