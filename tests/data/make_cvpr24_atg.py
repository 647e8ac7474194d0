"""Records cvpr24_atg.json by running the released ATG/ATG.py (YCaigogogo/CVPR24-CODER) itself.

Usage, outside the test suite: ``python make_cvpr24_atg.py PATH/TO/released/ATG/ATG.py OUT.json``.
The released module is loaded with stand-ins for what it cannot reach here: the openai 0.28 client
records the messages and answers canned text; CLIP features come from a rule naming which answer
items are too close to which class; ``CLIP``, ``CODER.template`` and ``nltk`` are empty modules.
Everything else (the prompts, the answer reading, the analogous follow-up loop) is the released code.
The released ``list(set(items))`` gets first-occurrence order (its own changes with PYTHONHASHSEED).
"""

import importlib.util
import json
import sys
import types

import torch
import torch.nn.functional as F  # noqa: N812

CLASSES = ["golden_retriever", "tabby cat", "tiger", "lion"]
TOO_CLOSE = {"Tiger": "tiger", "Big Cat": "lion", "Lion": "lion"}  # answer item -> the class it is too close to
SENT: list = []
ANSWERS: list = []


def _stub_modules() -> None:
    def create(model, messages):  # openai.ChatCompletion.create of openai 0.28
        SENT.append(messages)
        return {"choices": [{"message": {"content": ANSWERS.pop(0)}}]}

    openai = types.ModuleType("openai")
    openai.ChatCompletion = types.SimpleNamespace(create=create)
    clip = types.ModuleType("CLIP")
    clip.clip = None
    coder, template = types.ModuleType("CODER"), types.ModuleType("CODER.template")
    template.get_templates = lambda *a, **k: []
    nltk, corpus = types.ModuleType("nltk"), types.ModuleType("nltk.corpus")
    corpus.wordnet = None
    sys.modules.update({"openai": openai, "CLIP": clip, "CODER": coder, "CODER.template": template, "nltk": nltk,
                        "nltk.corpus": corpus})


def feature(text: str) -> torch.Tensor:
    """A class's own axis for its name, that class's axis for a name too close to it, else another."""
    name = (text[len("a photo of "):] if text.startswith("a photo of ") else text).strip()
    spoken = [c.replace("_", " ") for c in CLASSES]
    v = torch.zeros(64)
    if name in spoken:
        v[spoken.index(name)] = 1
    elif name in TOO_CLOSE:
        v[CLASSES.index(TOO_CLOSE[name])] = 1
    else:
        v[10 + sum(map(ord, name)) % 50] = 1
        v[63] = 0.3
    return F.normalize(v[None], dim=1)


def main(atg_path: str, out_path: str) -> None:
    _stub_modules()
    spec = importlib.util.spec_from_file_location("ATG", atg_path)
    atg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atg)
    atg.set = lambda xs: list(dict.fromkeys(xs))
    torch.Tensor.cuda = lambda self, *a, **k: self

    def generator():
        a = atg.ATG.__new__(atg.ATG)
        a.model, a.class_text_feats = "gpt-x", None
        a.get_text_feat = lambda text, use_template=True: feature(f"a photo of {text}" if use_template else text)
        names = [c.replace("_", " ") for c in CLASSES]
        a.get_total_text_feat = lambda dataset: (torch.cat([feature(f"a photo of {c}") for c in names]), names)
        return a

    cases = []

    def run(kind, classes, answers):
        SENT.clear()
        ANSWERS[:] = list(answers)
        items = generator().generate_text(kind, cls=list(classes), dataset="x", syno_expert="chatgpt")
        cases.append({"kind": kind, "classes": list(classes), "answers": list(answers), "sent": list(SENT),
                      "items": items})

    run("att", ["golden_retriever"], ["golden coat\n_feathered tail\n_ long tail\n_long tail\n_floppy ears\n\n_"])
    run("att", ["tabby cat"], ["- striped fur\n- green eyes"])
    run("att", ["tiger"], ["dark stripes_orange_coat\n_ \n_white underbelly"])
    run("syno", ["tabby cat"], ["Tabby\n_Striped cat\n_Tabby\n_Mackerel tabby"])
    run("ovo", ["golden_retriever", "tabby cat"],
        ["Long golden fur\n_Floppy ears\nFor tabby cat:\n_Striped coat\n_Pointed ears"])
    run("ovo", ["tiger", "lion"], ["Orange coat with stripes\n_Forest habitat\nFor lion:\n_Mane\n_Tawny coat"])
    run("ovo", ["tiger", "lion"], ["Stripes_Orange coat: bold\n_White belly"])
    run("ovo", ["lion", "tiger"], ["Mane\n_Tawny"])
    run("ana", ["tabby cat"], ["Leopard\n_Lynx\n_Ocelot"])
    run("ana", ["tabby cat"], ["Tiger\n_Lynx\n_Big Cat\n_Ocelot", "Cheetah\n_Lion", "Serval", "Tiger\n_Caracal", "Puma",
                               "Jaguarundi", "Bobcat"])
    doc = ("Made by make_cvpr24_atg.py running the released ATG/ATG.py (YCaigogogo/CVPR24-CODER) with a recording "
           "stand-in for openai.ChatCompletion and a stand-in CLIP feature for the analogous filter (names in "
           "'too_close' are within cosine 0.9 of that class). 'sent' is every message list the released code sent, "
           "'items' what generate_text returned. The released list(set(items)) was given first-occurrence order "
           "(its own order changes with PYTHONHASHSEED), the order coder-index documents.")
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump({"_doc": doc, "classes": CLASSES, "too_close": TOO_CLOSE, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
