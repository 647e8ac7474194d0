"""`coder-index reproduce`: the paper's Table 1 and Table 2 rows, computed the released way."""

from __future__ import annotations

from pathlib import Path

import click

from .common import friendly_errors, torch_threads_if
from .options import PARALLEL, options


def register(cli: click.Group) -> None:
    @cli.command("reproduce")
    @click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--expert-knowledge", "expert_knowledge", required=True,
                  type=click.Path(exists=True, file_okay=False),
                  help="The authors' released expert_knowledge/ folder (attribute/, simile_class/, synonym/, "
                       "ovo_attribute/).")
    @click.option("--class-names", "class_names", required=True, type=click.Path(exists=True, file_okay=False),
                  help="The released datasets/class_name/ folder: <dataset>.txt class lists in label order.")
    @click.option("--out", default="reproduction", show_default=True, type=click.Path(file_okay=False),
                  help="Folder for indexes/, one report per dataset, tables.md and tables.json.")
    @click.option("--datasets", default=None, metavar="LIST",
                  help="Comma-separated subset (e.g. ImageNet,DTD) [default: every zero-shot dataset found].")
    @click.option("--model", required=True, help="CLIP model, e.g. ViT-B-32 (the paper: RN50 ... ViT-L-14-336).")
    @options("pretrained", "device")
    @options("batch_size")
    @options(*PARALLEL)
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    @friendly_errors
    def reproduce_cmd(data_root: Path, expert_knowledge: str, class_names: str, out: str, datasets: str | None,
                      model: str, pretrained: str | None, device: str | None, batch_size: int, workers: int | None,
                      threads: int | None, quiet: bool) -> None:
        """Rows of the paper's Table 1 (CLIP, VCD, CODER, CODER*) and Table 2 (P, +Att, +Ana, +Syn) for
        every zero-shot dataset found under DATA_ROOT, built exactly as the released code builds them.

        For each dataset, an index is built with --preset cvpr24 from the expert knowledge, its
        test split is evaluated with the released rerank gate, and tables.md / tables.json
        collect the rows. Rerunning resumes: indexes and image embeddings are reused and
        finished datasets are not evaluated again.

        \b
        Data layouts recognised under DATA_ROOT (or DATA_ROOT/datasets/data, as in the released repo):
          <dataset>.csv or <dataset>/labels.csv        path,label
          <dataset>/split_zhou_*.json                  CoOp splits (Caltech101, DTD, EuroSAT, Food101, Pets)
          imagenet/val/<wnid>/                         ImageNet (sorted wnids = label order)
          imagenet_v2/imagenetv2-matched-frequency*/<label>/
          CUB200/test/<class>/, food-101/test/<class>/ ImageFolder
          places-365/places365_val.txt + val_256/      torchvision Places365
          oxford-pet/annotations/test.txt + images/    torchvision Oxford-IIIT Pet
          <dataset>/<class>/                           class folders
        Dataset folder names: the released keys (ImageNet, oxford-pet, DTD, CUB200, food-101, eurosat,
        caltech-101, places-365, ImageNet-V2) or coder-index's own (imagenet, oxford_pets, dtd, ...).

        \b
        Examples:
          coder-index reproduce /data --expert-knowledge expert_knowledge/ \\
              --class-names CVPR24-CODER/datasets/class_name --model ViT-B-32 --pretrained openai
          coder-index reproduce /data --expert-knowledge ek/ --class-names class_name/ --datasets ImageNet,DTD \\
              --model ViT-L-14 --pretrained /models/ViT-L-14.pt --out repro-l14
        """
        from coder_index.core.atomic import check_writable
        from coder_index.evaluation.reproduce import reproduce, tables

        check_writable(Path(out), "--out", is_dir=True)

        wanted = [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None
        with torch_threads_if(threads):
            result = reproduce(data_root, expert_knowledge, class_names, out, model=model, pretrained=pretrained,
                               datasets=wanted, device=device, batch_size=batch_size, workers=workers,
                               progress=not quiet)
        t = tables(result)
        click.echo((Path(out) / "tables.md").read_text(encoding="utf-8"))
        if result.missing:
            click.echo(f"not found under {data_root}: {', '.join(result.missing)}", err=True)
        click.echo(f"wrote {Path(out) / 'tables.md'} and tables.json ({len(t['datasets'])} dataset(s))", err=True)
