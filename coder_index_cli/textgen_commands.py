"""`coder-index generate` and `coder-index setup wordnet`, and the Auto Text Generator the LLM options make."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import click

from .common import friendly_errors
from .options import GENERATOR, LLM_CLIENT, options

KIND_CHOICES = ("attribute", "analogous", "synonym")


def make_generator(encoder: Any, llm_kind: str, base_url: str | None, llm_model: str, api_key_env: str,
                   concurrency: int, max_requests: int | None, temperature: float, cache_path: str | None,
                   max_answer_chars: int = 4000, max_retries: int = 6, max_tokens: int | None = None,
                   synonyms_from: str = "wordnet", analogous_threshold: float = 0.9, filter_model: str | None = None,
                   filter_pretrained: str | None = None, prompts: str = "default", planning_only: bool = False) -> Any:
    """The Auto Text Generator the LLM options describe; ``prompts='cvpr24'`` sends the released
    generator's prompts and reads its answers the released way (the ``cvpr24`` preset).
    ``planning_only`` (``--dry-run``): a generator that only counts prompts and cache hits: no API key
    is asked for and no CLIP model is loaded (``encoder`` may be None). ``max_tokens``: None for the
    default (``llm.DEFAULT_MAX_TOKENS``; none under cvpr24, as released), 0 to send none."""
    from coder_index.textgen.generator import AutoTextGenerator
    from coder_index.textgen.llm import LLMCache, LLMClient, LLMConfig, default_max_tokens

    llm = None
    if llm_kind == "openai":
        tokens = default_max_tokens(prompts) if max_tokens is None else (max_tokens or None)
        llm = LLMClient(LLMConfig(model=llm_model, base_url=base_url, api_key_env=api_key_env,
                                  concurrency=concurrency, max_requests=max_requests, temperature=temperature,
                                  max_tokens=tokens, max_answer_chars=max_answer_chars, max_retries=max_retries),
                        LLMCache(cache_path))
        if not planning_only:
            llm.check_credentials()  # a missing key is reported before any image or text is processed
    filter_encoder = None
    if filter_model and not planning_only:
        from coder_index.model.encoder import ClipEncoder

        filter_encoder = ClipEncoder(filter_model, filter_pretrained, device=str(encoder.device))
    return AutoTextGenerator(encoder, llm, synonym_source=synonyms_from, analogous_threshold=analogous_threshold,
                             filter_encoder=filter_encoder, prompts=prompts)


def parse_kinds(kinds: str) -> list[str]:
    out = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in out if k not in KIND_CHOICES]
    if bad or not out:
        raise click.BadParameter(f"kinds are a comma-separated subset of {','.join(KIND_CHOICES)}; got {kinds!r}")
    return out


def report_generation(stats: Any, dry: Any | None = None) -> None:
    echo = functools.partial(click.echo, err=True)
    for kind, n in stats.with_kind.items():
        missing = stats.missing.get(kind, [])
        tail = f" (none for: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''})" if missing else ""
        echo(f"{kind}: {n}/{stats.classes} classes{tail}")
    if stats.not_in_wordnet:
        echo(f"not in WordNet ({len(stats.not_in_wordnet)}): {', '.join(stats.not_in_wordnet[:8])}"
             f"{' …' if len(stats.not_in_wordnet) > 8 else ''} — these get name texts only")
    if stats.analogous_dropped:
        echo(f"analogous filter dropped {stats.analogous_dropped} name(s) too close to other classes; "
             f"{stats.analogous_followups} follow-up prompt(s)")
    if stats.llm_summary:
        echo(f"LLM: {stats.llm_summary}")
    if getattr(stats, "foreign_bullets", None):
        few = ", ".join(stats.foreign_bullets[:5]) + (" …" if len(stats.foreign_bullets) > 5 else "")
        echo(f"warning: the LLM answered {len(stats.foreign_bullets)} class(es) with '- ' or numbered bullets ({few}); "
             "--preset cvpr24 reads answers the released way, splitting on '_' only, so each such answer became one "
             "garbled text. Use an LLM that follows the released '_' format, or --preset default (which reads "
             "any bullets)")
    if stats.stopped_by_budget:
        echo("stopped at the request budget (--max-requests): what was fetched is kept and cached; "
             "rerun with a larger budget to complete it")


def register(cli: click.Group) -> None:
    @cli.command()
    @click.option("--classes", "classes_file", required=True, type=click.Path(exists=True, dir_okay=False),
                  help="Class names, one per line.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                  help="Knowledge file to write (JSON).")
    @click.option("--kinds", default="attribute,analogous,synonym", show_default=True,
                  help="Comma-separated kinds to generate.")
    @options("preset", *GENERATOR, *LLM_CLIENT, "new_model", "model_index", "pretrained", "device")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
    @friendly_errors
    def generate(classes_file: str, out: Path, kinds: str, preset: str | None, model: str | None, index_dir: str | None,
                 pretrained: str | None, device: str | None, quiet: bool, dry_run: bool, **llm: Any) -> None:
        """Generate attribute, analogous and synonym texts for a vocabulary into a knowledge file.

        Answers are cached: a rerun, or another vocabulary sharing classes, sends no request for
        what it already has, and an interrupted run resumes. The API key comes from the environment.

        \b
        Examples:
          export OPENAI_API_KEY=...
          coder-index generate --classes classes.txt --out knowledge.json --llm-model gpt-4o-mini
          coder-index generate --classes classes.txt --out k.json --base-url http://localhost:8000/v1 \\
              --llm-model Qwen2.5-7B-Instruct --concurrency 32 --max-requests 5000
      coder-index generate --classes classes.txt --out k.json --max-tokens 1200   # longer answers allowed
          coder-index generate --classes classes.txt --out k.json --llm none     # offline, WordNet
          coder-index generate --classes classes.txt --out k.json --preset cvpr24  # the authors' prompts
          coder-index generate --classes classes.txt --out k.json --dry-run
        """
        from coder_index.core.atomic import check_writable
        from coder_index.core.sources import read_class_list
        from coder_index.methods.text_index import TextIndex
        from coder_index.model.encoder import ClipEncoder

        classes = read_class_list(classes_file)
        kind_list = parse_kinds(kinds)
        if dry_run:  # counts prompts and cache hits: no model loaded, no API key needed, nothing written
            gen = make_generator(None, **llm, prompts=preset or "default", planning_only=True)
            d = gen.dry_run(classes, kind_list)
            click.echo(f"would send {d.prompts} prompt(s) for {len(classes)} classes ({d.cached} already cached)"
                       + ("; analogous filtering may add follow-up prompts" if "analogous" in d.kinds else ""))
            return
        check_writable(out, "--out")
        encoder = TextIndex.open(index_dir, device=device).encoder if index_dir else \
            ClipEncoder(model or "ViT-B-32", pretrained, device=device)
        gen = make_generator(encoder, **llm, prompts=preset or "default")
        knowledge, stats = gen.generate(classes, kind_list, progress=not quiet)
        report_generation(stats)
        if any(knowledge.counts().values()):
            knowledge.save(out)
            click.echo(f"wrote {out}: " + ", ".join(f"{v} {k}" for k, v in knowledge.counts().items() if v), err=True)
        failed = {c for cs in stats.failed.values() for c in cs}
        if failed:
            which = "; ".join(f"{k}: " + ", ".join(v[:5]) + (" …" if len(v) > 5 else "")
                              for k, v in stats.failed.items())
            nothing = "" if any(knowledge.counts().values()) else f"; nothing was written to {out}"
            raise click.ClickException(
                f"{len(failed)} of {len(classes)} class(es) got no answer from the LLM for some kinds ({which})"
                f"{nothing}. Rerun the same command to retry them: answers already received are cached.")

    @cli.group()
    def setup() -> None:
        """Prepare data files coder-index reads (WordNet).

        \b
        Examples:
          apt-get install wordnet-base wordnet-sense-index && coder-index setup wordnet
          coder-index setup wordnet --download        # online: nltk.download('wordnet')
        """

    @setup.command("wordnet")
    @click.option("--from", "source", default=None, type=click.Path(exists=True, file_okay=False),
                  help="A WordNet 3.0 dict folder [default: /usr/share/wordnet from Debian's wordnet-base].")
    @click.option("--target", default=None, type=click.Path(file_okay=False),
                  help="nltk_data folder to write into [default: $NLTK_DATA or ~/nltk_data].")
    @click.option("--download", is_flag=True, help="Use nltk.download('wordnet') instead (needs internet).")
    @friendly_errors
    def setup_wordnet_cmd(source: str | None, target: str | None, download: bool) -> None:
        """Make an NLTK-readable WordNet 3.0 (for synonyms and the offline generator).

        \b
        Examples:
          apt-get install wordnet-base wordnet-sense-index && coder-index setup wordnet
          coder-index setup wordnet --from /opt/WordNet-3.0/dict --target ~/nltk_data
          coder-index setup wordnet --download
        """
        from coder_index.textgen.wordnet import default_nltk_dir, setup_wordnet

        dest = setup_wordnet(source, target, download)
        click.echo(f"WordNet ready in {dest}")
        if target and Path(target).resolve() != default_nltk_dir().resolve():
            click.echo(f"NLTK looks there only when told: export NLTK_DATA={Path(target).resolve()}")


